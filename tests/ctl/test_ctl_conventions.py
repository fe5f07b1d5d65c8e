"""kata-vfio-ctl's conventions as an operator meets them: one `VENDOR:DEVICE[:CLASS]`
parser for `devices -d` and `io.kata-vfio.select`, `--version`, exit codes, examples in
`--help`, bind that decides before it moves, a held lock that says what it waits for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kata_vfio.errors import KataVfioError
from kata_vfio.pci import PciAddress, list_addresses, read_device
from kata_vfio_ctl.main import main as ctl
from kata_vfio_host.allocate import parse_select
from kata_vfio_host.ledger import Host, read_journal

from fakesys import NVME, FakeKernel, FakeSysfs
from wrapper_run import SOURCE_PATH, write_config


@pytest.fixture
def ctl_config(vfio_host: FakeSysfs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    config = tmp_path / "kv.toml"
    config.write_text(
        f'runtime = "/bin/true"\nsysfs = "{vfio_host.root}"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        f'log_file = "{tmp_path / "kata-vfio.log"}"\n'
    )
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


ETHERNET = [
    "0000:03:00.0",
    "0000:04:00.0",
    "0000:04:01.0",
    "0000:06:00.0",
    "0000:06:10.0",
    "0000:07:00.0",
]


@pytest.mark.parametrize(
    ("text", "matched"),
    [
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
    ],
)
def test_devices_d_and_select_share_one_parser(
    text: str,
    matched: list[str] | None,
    ctl_config: Path,
    vfio_host: FakeSysfs,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, listed, err = devices_d(text, capsys)
    chosen = selected(text, vfio_host.root)
    if matched is None:
        assert code == 2 and isinstance(chosen, str)
        line = err.strip()
        assert len(line.splitlines()) == 1 and "VENDOR:DEVICE[:CLASS]" in line, err
        # one set of messages: the same words, each naming where the text came from
        # (the examples after "e.g." differ: select's take a *COUNT)
        assert (
            line.removeprefix("kata-vfio-ctl: devices -d: ").split(", e.g.")[0]
            == chosen.removeprefix("io.kata-vfio.select: ").split(", e.g.")[0]
        ), (line, chosen)
    else:
        assert code == 0, err
        assert listed == matched and chosen == matched


def pyproject_version() -> str:
    import tomllib

    with open(Path(__file__).resolve().parents[2] / "pyproject.toml", "rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def run_module(module: str, args: list[str], config: Path) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": SOURCE_PATH,
        "KATA_VFIO_CONFIG": str(config),
    }
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env=env,
        text=True,
        capture_output=True,
        timeout=60,
        check=False,
    )


def fake_inner(directory: Path, name: str, answer: str) -> Path:
    """An inner runtime or shim that answers with `answer` and the arguments it got."""
    path = directory / name
    path.write_text(f'#!/bin/sh\necho "{answer} $*"\n')
    path.chmod(0o755)
    return path


def test_kata_vfio_ctl_version(tmp_path: Path) -> None:
    result = run_module("kata_vfio_ctl.main", ["--version"], write_config(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"kata-vfio-ctl {pyproject_version()}\n"


@pytest.mark.parametrize("flag", ["--version", "-v"])
def test_kata_vfio_version_then_the_inner_runtimes(flag: str, tmp_path: Path) -> None:
    inner = fake_inner(tmp_path, "runc", "runc version 1.1.5")
    result = run_module(
        "kata_vfio_runtime.main", [flag], write_config(tmp_path, runtime=str(inner))
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"kata-vfio version {pyproject_version()}\nrunc version 1.1.5 {flag}\n"


@pytest.mark.parametrize("flag", ["-v", "--v", "-v=true", "--version", "-version"])
def test_shim_version_in_go_flag_forms(flag: str, tmp_path: Path) -> None:
    inner = fake_inner(tmp_path, "containerd-shim-kata-v2", "containerd-shim-kata-v2: got")
    result = run_module("kata_vfio_runtime.shim", [flag], write_config(tmp_path, shim=str(inner)))
    assert result.returncode == 0, result.stderr
    # the inner shim is asked with the -v every Go shim knows
    assert result.stdout == (
        f"containerd-shim-kata-vfio-v2:\n  Version: {pyproject_version()}\n"
        "containerd-shim-kata-v2: got -v\n"
    )


def test_shim_v_false_is_not_a_version_request() -> None:
    from kata_vfio_runtime.shim import parse_shim_args

    assert not parse_shim_args(["shim", "-v=false", "-id", "x", "start"]).version
    assert parse_shim_args(["shim", "-id", "x", "-v", "start"]).version


def test_version_from_the_dist_info_or_says_not_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kata_vfio.version import NOT_INSTALLED, package_version

    monkeypatch.setattr(sys, "path", [str(tmp_path / "missing"), str(tmp_path)])
    assert package_version() == NOT_INSTALLED
    (tmp_path / "kata_vfio-9.8.7.dist-info").mkdir()
    (tmp_path / "kata_vfio-9.8.7.dist-info/METADATA").write_text(
        "Metadata-Version: 2.1\nName: kata-vfio\nVersion: 9.8.7\n\nVersion: 0\n"
    )
    assert package_version() == "9.8.7"


def test_bind_refusing_the_second_device_moves_and_says_nothing_of_the_first(
    ctl_config: Path, vfio_host: FakeSysfs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # "lo" is up with addresses on every host: the second device is in use
    vfio_host.add_device("0000:00:03.0", (0x1AF4, 0x1041, 0x020000), group=30, driver="virtio-pci")
    vfio_host.add_child_interface("0000:00:03.0", "lo", "virtio2")
    before = {str(p): p.read_text() for p in vfio_host.root.rglob("driver_override")}
    code = ctl(["bind", "0000:05:00.0", "0000:00:03.0"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "moving" not in out, out
    assert "0000:00:03.0 is in use" in err and "nothing was moved" in err, err
    assert {str(p): p.read_text() for p in vfio_host.root.rglob("driver_override")} == before
    assert vfio_host.driver("0000:05:00.0") == "nvme"
    assert not (tmp_path / "state").exists() or not read_journal(
        Host(vfio_host.root, tmp_path / "state")
    )


def test_a_held_ledger_lock_is_named_then_given_up_on(ctl_config: Path, tmp_path: Path) -> None:
    import fcntl
    import time

    lock = tmp_path / "state/locks/group-14"  # 0000:05:00.0's IOMMU group (conftest)
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen(  # another process holds the group's ledger lock
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            f"f = open({str(lock)!r}, 'w'); fcntl.flock(f, fcntl.LOCK_EX)\n"
            "print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": SOURCE_PATH,
            "KATA_VFIO_CONFIG": str(ctl_config),
            "KATA_VFIO_LOCK_TIMEOUT": "3",
        }
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "kata_vfio_ctl.main", "bind", "0000:05:00.0"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        waited = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith(
        f"kata-vfio-ctl: waiting for the lock {lock}, held by pid "
        f"{holder.pid} ({sys.executable} -c import fcntl, sys, time "
        "f = open("
    ) and lines[0].endswith("(giving up after 3 s)")
    assert lines[1].startswith(
        f"kata-vfio-ctl: gave up after 3 s waiting for the lock {lock}, held by pid {holder.pid}"
    ), lines[1]
    assert "KATA_VFIO_LOCK_TIMEOUT" in lines[1]
    assert waited >= 3
    assert "moving" not in result.stdout
    with open(lock) as f:  # nothing left holding it
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


PF = "0000:00:06.0"


@pytest.fixture
def pf_host(
    tmp_path: Path, fakesys: FakeSysfs, kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch
) -> Host:
    """An SR-IOV PF with 4 possible VFs; the CLI writes sysfs through the fake kernel."""
    fakesys.add_device(PF, NVME, group=6, driver="nvme")
    fakesys.add_sriov_pf(PF, total=4, vf_ids=NVME, group_base=20)
    host = Host(fakesys.root, tmp_path / "state", kernel.write, boot_id="b")
    config = tmp_path / "kv.toml"
    config.write_text(
        f'sysfs = "{fakesys.root}"\nstate_dir = "{host.state_dir}"\n'
        f'log_file = "{tmp_path / "kata-vfio.log"}"\n'
    )
    monkeypatch.setenv("KATA_VFIO_CONFIG", str(config))
    monkeypatch.setattr("kata_vfio_ctl.base._host", lambda args: host)
    return host


def test_vfs_says_the_next_step_and_json(pf_host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl(["vfs", PF, "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith(
        "next: kata-vfio-ctl bind 0000:01:00.0 0000:01:00.1 hands them to vfio-pci"
    ), out
    assert ctl(["vfs", PF, "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pf"] == PF and result["unbound"] == ["0000:01:00.0", "0000:01:00.1"]
    assert [v["driver"] for v in result["vfs"]] == [None, None]


def test_resizing_refuses_to_drop_the_admins_binds_silently(
    pf_host: Host, fakesys: FakeSysfs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(["vfs", PF, "2"]) == 0
    assert ctl(["bind", "0000:01:00.1"]) == 0
    capsys.readouterr()
    assert ctl(["vfs", PF, "3"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert "kata-vfio bound 0000:01:00.1; changing the count to 3 removes them all" in err
    assert "kata-vfio-ctl restore 0000:01:00.1" in err and "--force" in err
    assert fakesys.driver("0000:01:00.1") == "vfio-pci" and len(vf_drivers(fakesys)) == 2
    assert ctl(["vfs", PF, "3", "--force"]) == 0
    assert (
        "the binds of 0000:01:00.1 went with the old virtual functions" in capsys.readouterr().out
    )
    assert len(vf_drivers(fakesys)) == 3
    log = [json.loads(line) for line in (tmp_path / "kata-vfio.log").read_text().splitlines()]
    refused = [r for r in log if r.get("command") == "vfs"]
    assert refused[-1]["binds_dropped"] == ["0000:01:00.1"]


def vf_drivers(fs: FakeSysfs) -> dict[str, str | None]:
    return {
        str(PciAddress(0, 1, 0, i)): fs.driver(str(PciAddress(0, 1, 0, i)))
        for i in range(4)
        if fs.dev_dir(str(PciAddress(0, 1, 0, i))).exists()
    }


def test_bind_and_restore_json(pf_host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl(["vfs", PF, "1"]) == 0
    capsys.readouterr()
    assert ctl(["bind", "0000:01:00.0", "--json"]) == 0
    bound = json.loads(capsys.readouterr().out)
    assert bound["moves"] == [{"address": "0000:01:00.0", "ids": "1b36:0010", "driver": None}]
    assert bound["groups"][0]["address"] == "0000:01:00.0"
    assert bound["groups"][0]["node"].startswith("/dev/vfio/")
    assert ctl(["restore", "0000:01:00.0", "--json"]) == 0
    restored = json.loads(capsys.readouterr().out)
    assert restored["restored"] == ["0000:01:00.0"] and restored["failed"] == []


def test_restore_stale_says_what_happened(
    pf_host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(["restore", "--stale"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("no container is gone: nothing to release"), out
    assert "released" not in out.replace("nothing to release", "")


def test_restore_stale_of_a_gone_container_whose_devices_stay_on_vfio(
    pf_host: Host, tmp_path: Path, fakesys: FakeSysfs, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from kata_vfio_host.settings import Settings
    from kata_vfio_runtime.lifecycle import prepare_bundle

    from test_allocate import NoLog, make_bundle

    assert ctl(["vfs", PF, "1"]) == 0 and ctl(["bind", "0000:01:00.0"]) == 0
    bundle = make_bundle(tmp_path, "holder", "1b36:0010")
    prepare_bundle(
        "holder",
        bundle,
        Settings(sysfs=str(pf_host.sysfs), state_dir=str(pf_host.state_dir)),
        pf_host,
        NoLog(),
    )
    shutil.rmtree(bundle)  # the engine removed the container: its owner is gone
    capsys.readouterr()
    assert ctl(["restore", "--stale"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "container holder is gone: its claims were dropped",
        "no device needed giving back: they stay on vfio-pci, free for the next "
        "container (kata-vfio-ctl restore --all gives back what kata-vfio bound)",
    ]
    assert fakesys.driver("0000:01:00.0") == "vfio-pci"


def subcommands() -> dict[str, object]:
    from kata_vfio_ctl.parser import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return dict(action.choices)


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_command_shows_examples_that_parse(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import shlex

    from kata_vfio_ctl.parser import build_parser

    with pytest.raises(SystemExit) as done:
        ctl([name, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "\nexamples:\n" in text, text
    examples = [
        line.strip() for line in text.split("\nexamples:\n", 1)[1].splitlines() if line.strip()
    ]
    assert examples and all(e.startswith(f"kata-vfio-ctl {name}") for e in examples), examples
    for example in examples:
        argv = shlex.split(example.split(" | ")[0], comments=True)[1:]
        args = build_parser().parse_args(argv)  # a usage error here exits 2
        assert args.command == name


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        # usage errors: 2
        (["no-such-command"], 2),
        (["bind"], 2),
        (["bind", "--no-such-flag", "03:00.0"], 2),
        (["vfs", PF, "many"], 2),
        (["devices", "-d", "8086"], 2),
        (["devices", "-d", "8086:10d3:02"], 2),  # was 0 with an empty table
        (["devices", "--name", "("], 2),
        (["restore"], 2),
        (["restore", "--all", "--stale"], 2),
        # refusals: 1
        (["bind", "0000:09:00.0"], 1),  # no such device
        (["bind", "no-such-if0"], 1),
        (["bind", "0000:07:00.0"], 1),  # no IOMMU group
        (["vfs", "0000:05:00.0", "2"], 1),  # no SR-IOV
        (["restore", "zz:zz.z"], 1),
        # fine: 0
        (["devices", "-d", "::0200"], 0),
        (["restore", "--stale"], 0),
    ],
)
def test_exit_codes_usage_2_refusal_1(argv: list[str], code: int, ctl_config: Path) -> None:
    result = run_module("kata_vfio_ctl.main", argv, ctl_config)
    assert result.returncode == code, (result.stdout, result.stderr)
    if code:
        assert "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("kata-vfio-ctl"), result.stderr


def test_devices_takes_binds_forms_and_shows_lspci_class_names(
    ctl_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a short address, a full one, an interface name (kvfiotest0 is on 0000:06:00.0)
    assert ctl(["devices", "05:00.0", "0000:03:00.0", "kvfiotest0", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["address"] for r in records] == ["0000:03:00.0", "0000:05:00.0", "0000:06:00.0"]
    assert {r["address"]: r["class_name"] for r in records} == {
        "0000:03:00.0": "Ethernet controller",
        "0000:05:00.0": "Non-Volatile memory controller",
        "0000:06:00.0": "Ethernet controller",
    }
    assert ctl(["devices", "05:*"]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    assert line.startswith("0000:05:00.0") and "Non-Volatile memory controller: " in line
    assert ctl(["devices", "no-such-if0"]) == 1
    assert "no PCI device or network interface 'no-such-if0'" in capsys.readouterr().err


def test_class_names_fall_back_as_lspci_does_without_pci_ids(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from kata_vfio_host import pciids

    monkeypatch.setattr(pciids, "PCI_IDS", (tmp_path / "absent.ids",))
    pciids._class_table.cache_clear()
    try:
        assert pciids.class_name(0x020000) == "Class 0200"
    finally:
        pciids._class_table.cache_clear()


def test_devices_free_says_why_nothing_is_free(
    ctl_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(["devices", "--free", "05:00.0", "07:00.0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "nothing is free:", out
    assert out[1].startswith(
        "  0000:05:00.0: is in IOMMU group 14 with 0000:05:00.0 on nvme, "
        "not in the auto-bind allow-list"
    ), out
    assert out[2] == "  0000:07:00.0: no IOMMU group"


def test_under_systemd_events_go_to_the_journal_with_priorities(
    ctl_config: Path, tmp_path: Path
) -> None:
    """JOURNAL_STREAM names the stderr systemd connected: each event is a `<N>` line there
    (a failed restore at error, 3), the file log is kept, and the error field is text."""
    stderr_file = tmp_path / "stderr"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": SOURCE_PATH,
        "KATA_VFIO_CONFIG": str(ctl_config),
    }
    with open(stderr_file, "w") as err:
        st = os.fstat(err.fileno())
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run(
            [sys.executable, "-m", "kata_vfio_ctl.main", "vfs", "0000:05:00.0", "2"],
            env=env,
            stderr=err,
            stdout=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )
    lines = stderr_file.read_text().splitlines()
    assert lines[0].startswith(
        '<3>kata-vfio-ctl: virtual functions not set command="vfs" '
        'pf="0000:05:00.0" count=2 error="PCI device 0000:05:00.0 has '
        "no SR-IOV"
    ), lines
    assert lines[-1].startswith("kata-vfio-ctl: PCI device 0000:05:00.0 has no SR-IOV")
    record = json.loads((tmp_path / "kata-vfio.log").read_text().splitlines()[-1])
    assert record["level"] == "error" and record["event"] == "virtual functions not set"
    assert record["error"].startswith("PCI device 0000:05:00.0 has no SR-IOV capability")
    # not the journal's stream (a redirected stderr): no <N> lines
    env["JOURNAL_STREAM"] = "1:1"
    result = subprocess.run(
        [sys.executable, "-m", "kata_vfio_ctl.main", "vfs", "0000:05:00.0", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1 and not result.stderr.startswith("<")


def test_journal_lines_are_text_with_the_level_as_priority() -> None:
    from kata_vfio_host.hostlog import journal_line

    assert (
        journal_line(
            {
                "event": "restore failed",
                "level": "error",
                "tool": "kata-vfio-ctl",
                "failures": ["0000:03:00.0: driver nvme refused it"],
            }
        )
        == '<3>kata-vfio-ctl: restore failed failures=["0000:03:00.0: driver nvme refused it"]'
    )


def test_a_failed_restore_is_logged_as_an_error(
    pf_host: Host, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = ctl(["restore", PF])  # kata-vfio never bound it: nothing can go back
    err = capsys.readouterr().err
    log = [json.loads(line) for line in (tmp_path / "kata-vfio.log").read_text().splitlines()]
    assert code == 1 and f"cannot restore {PF}: not bound by kata-vfio" in err, err
    assert log[-1]["event"] == "restore failed" and log[-1]["level"] == "error", log[-1]
    assert log[-1]["failures"] == [f"{PF}: not bound by kata-vfio (see kata-vfio-ctl devices)"]


@pytest.mark.parametrize(
    ("module", "argv", "code"),
    [
        ("kata_vfio_runtime.main", ["create", "--bundle"], 2),  # usage
        ("kata_vfio_runtime.main", ["create", "--bundle", "/nonexistent-bundle", "c1"], 1),
        ("kata_vfio_runtime.shim", ["-id", "c1", "-bundle", "/nonexistent-bundle", "start"], 1),
    ],
)
def test_exit_codes_of_the_wrappers(
    module: str, argv: list[str], code: int, tmp_path: Path
) -> None:
    config = write_config(tmp_path, runtime="/bin/true", shim="/bin/true")
    result = run_module(module, argv, config)
    assert result.returncode == code, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
