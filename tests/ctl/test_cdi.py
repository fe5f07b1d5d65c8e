"""The CDI spec: which groups it offers, under which names, with which nodes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from kata_vfio.errors import KataVfioError
from kata_vfio_ctl import cdi
from kata_vfio_ctl.cdi import build_spec, survey_groups

from fakesys import FakeSysfs


def ctl(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cdi.add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KataVfioError as err:
        print(f"kata-vfio-ctl: {err.one_line()}")
        return err.exit_code


def group_node(group: int, minor: int) -> dict[str, object]:
    return {"path": f"/dev/vfio/{group}", "type": "c", "major": 243, "minor": minor}


def test_one_device_per_endpoint_of_each_usable_group(vfio_host: FakeSysfs) -> None:
    # bound to vfio-pci's driver_override but vfio-pci never claimed it: no /dev/vfio/30
    vfio_host.add_device("0000:08:00.0", group=30, driver=None)
    usable, skipped = survey_groups(vfio_host.root)
    assert [(g.group.number, g.devnum, [str(a) for a in g.endpoints]) for g in usable] == [
        (12, (243, 0), ["0000:03:00.0"]),
        (13, (243, 1), ["0000:04:00.0", "0000:04:01.0"]),  # the bridge is no device
        (21, (243, 2), ["0000:06:10.0"]),
    ]
    reasons = {g.group.number: g.reason for g in skipped}
    assert reasons[14] == (
        "0000:05:00.0 is on nvme (hand the group to vfio-pci: kata-vfio-ctl bind 0000:05:00.0)"
    )
    assert reasons[20].startswith("0000:06:00.0 is on igb")
    assert reasons[30].startswith("/dev/vfio/30 does not exist")

    spec = build_spec(usable)
    assert spec == {
        "cdiVersion": "0.5.0",
        "kind": "kata-vfio.io/pci",
        "devices": [
            {"name": "0000:03:00.0", "containerEdits": {"deviceNodes": [group_node(12, 0)]}},
            {"name": "0000:04:00.0", "containerEdits": {"deviceNodes": [group_node(13, 1)]}},
            {"name": "0000:04:01.0", "containerEdits": {"deviceNodes": [group_node(13, 1)]}},
            {"name": "0000:06:10.0", "containerEdits": {"deviceNodes": [group_node(21, 2)]}},
        ],
        "containerEdits": {
            "deviceNodes": [{"path": "/dev/vfio/vfio", "type": "c", "major": 10, "minor": 196}]
        },
    }


def test_command_writes_the_spec_atomically_and_says_what_it_left_out(
    vfio_host: FakeSysfs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "etc/cdi/kata-vfio.json"
    assert ctl("cdi", "--sysfs", str(vfio_host.root), "--output", str(out)) == 0
    spec = json.loads(out.read_text())
    assert [d["name"] for d in spec["devices"]] == [
        "0000:03:00.0",
        "0000:04:00.0",
        "0000:04:01.0",
        "0000:06:10.0",
    ]
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in out.parent.iterdir()) == ["kata-vfio.json"]  # no temp left
    captured = capsys.readouterr()
    assert "4 devices: kata-vfio.io/pci=0000:03:00.0, " in captured.out
    assert "IOMMU group 14 left out: 0000:05:00.0 is on nvme" in captured.err

    assert ctl("cdi", "--sysfs", str(vfio_host.root), "--output", "-") == 0
    assert json.loads(capsys.readouterr().out) == spec


def test_no_usable_group_removes_a_stale_spec(
    fakesys: FakeSysfs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fakesys.add_device("0000:05:00.0", group=14, driver="nvme")
    out = tmp_path / "kata-vfio.json"
    out.write_text('{"cdiVersion": "0.5.0", "kind": "kata-vfio.io/pci", "devices": []}')
    assert ctl("cdi", "--sysfs", str(fakesys.root), "--output", str(out)) == 1
    assert not out.exists()
    assert (
        "no IOMMU group is usable by VFIO on this host, so there is no CDI device "
        f"({out} removed); hand a device to vfio-pci first"
    ) in capsys.readouterr().out
