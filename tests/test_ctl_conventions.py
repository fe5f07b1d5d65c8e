"""kata-vfio-ctl's conventions as an operator meets them: one `VENDOR:DEVICE[:CLASS]`
parser for `devices -d` and `io.kata-vfio.select`, `--version`, exit codes, examples in
`--help`, bind that decides before it moves, a held lock that says what it waits for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kata_vfio.errors import KataVfioError
from kata_vfio.pci import list_addresses, read_device
from kata_vfio_ctl.main import main as ctl
from kata_vfio_host.allocate import parse_select

from fakesys import FakeSysfs


@pytest.fixture
def ctl_config(vfio_host: FakeSysfs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    config = tmp_path / "kv.toml"
    config.write_text(f'runtime = "/bin/true"\nsysfs = "{vfio_host.root}"\n'
                      f'state_dir = "{tmp_path / "state"}"\n'
                      f'log_file = "{tmp_path / "kata-vfio.log"}"\n')
    monkeypatch.setenv("KATA_VFIO_CONFIG", str(config))
    return config


def devices_d(text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], str]:
    """`kata-vfio-ctl devices -d TEXT --json`: exit code, addresses listed, stderr."""
    code = ctl(["devices", "-d", text, "--json"])
    out, err = capsys.readouterr()
    return code, [r["address"] for r in json.loads(out)] if code == 0 else [], err


def selected(text: str, sysfs: Path) -> list[str] | str:
    """What `io.kata-vfio.select=TEXT` matches on the host, or its one-line refusal."""
    try:
        request = parse_select(text)[0]
    except KataVfioError as exc:
        return exc.one_line()
    return [str(a) for a in list_addresses(sysfs) if request.matches(read_device(sysfs, a))]


ETHERNET = ["0000:03:00.0", "0000:04:00.0", "0000:04:01.0", "0000:06:00.0", "0000:06:10.0",
            "0000:07:00.0"]


@pytest.mark.parametrize(("text", "matched"), [
    ("::020000", ETHERNET),  # the full 24-bit class: devices -d matched nothing before
    ("::0200", ETHERNET),
    ("*:*:0108", ["0000:05:00.0"]),
    ("1b36:0010", ["0000:05:00.0"]),
    ("8086:10CA", ["0000:06:10.0"]),
    ("8086:10d3:02", None),  # a 2-digit class: devices -d printed an empty table before
    ("8086", None),
    ("8086:zz", None),
    ("80866:10d3", None),
    ("1:2:3:4", None),
])
def test_devices_d_and_select_share_one_parser(
        text: str, matched: list[str] | None, ctl_config: Path, vfio_host: FakeSysfs,
        capsys: pytest.CaptureFixture[str]) -> None:
    code, listed, err = devices_d(text, capsys)
    chosen = selected(text, vfio_host.root)
    if matched is None:
        assert code == 2 and isinstance(chosen, str)
        line = err.strip()
        assert len(line.splitlines()) == 1 and "VENDOR:DEVICE[:CLASS]" in line, err
        # one set of messages: the same words, each naming where the text came from
        # (the examples after "e.g." differ: select's take a *COUNT)
        assert line.removeprefix("kata-vfio-ctl: devices -d: ").split(", e.g.")[0] == \
            chosen.removeprefix("io.kata-vfio.select: ").split(", e.g.")[0], (line, chosen)
    else:
        assert code == 0, err
        assert listed == matched and chosen == matched
