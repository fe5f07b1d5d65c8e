"""The wrapper as an OCI runtime: argv, pid and fds reach the inner runtime; errors are clean."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kata_vfio.manifest import DEVICES_ANNOTATION, MANIFEST_ANNOTATION

from fakesys import FakeSysfs
from test_args import CASES
from wrapper_run import SOURCE_PATH, make_recorder, run_wrapper, wrapper_command, write_config


@pytest.fixture
def runtime_env(tmp_path: Path, vfio_host: FakeSysfs) -> tuple[Path, Path]:
    recorder = make_recorder(tmp_path)
    config = write_config(
        tmp_path,
        runtime=str(recorder),
        sysfs=str(vfio_host.root),
        log_file=str(tmp_path / "kata-vfio.log"),
    )
    return config, tmp_path / "record.json"


@pytest.mark.parametrize(("argv", "_expected"), CASES)
def test_inner_runtime_gets_the_same_argv(
    runtime_env: tuple[Path, Path], bundle: Path, argv: list[str], _expected: Any
) -> None:
    config, record = runtime_env
    argv = [re.sub(r"(^|=)/b\d*$", lambda m: m.group(1) + str(bundle), a) for a in argv]
    result = run_wrapper(argv[1:], config, record, cwd=bundle)
    assert result.returncode == 0, result.stderr
    # the wrapper says nothing of its own, except its version line before the inner's
    from kata_vfio.version import package_version

    ours = f"kata-vfio version {package_version()}\n" if argv[1:] in (["--version"], ["-v"]) else ""
    assert (result.stdout, result.stderr) == (ours, "")
    recorded = json.loads(record.read_text())
    assert recorded["argv"][1:] == argv[1:]


def test_same_pid_stdin_and_inherited_fds(runtime_env: tuple[Path, Path], bundle: Path) -> None:
    config, record = runtime_env
    read_end, write_end = os.pipe()
    os.write(write_end, b"preserved fd payload")
    os.close(write_end)
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": SOURCE_PATH,
        "KATA_VFIO_CONFIG": str(config),
        "RECORDER_OUT": str(record),
        "RECORDER_EXIT": "7",
    }
    proc = subprocess.Popen(
        [*wrapper_command(), "create", "--bundle", str(bundle), "--preserve-fds", "1", "ctr"],
        env=env,
        stdin=subprocess.PIPE,
        pass_fds=(read_end,),
        text=True,
    )
    proc.communicate("stdin for the container", timeout=60)
    os.close(read_end)
    recorded = json.loads(record.read_text())
    assert proc.returncode == 7  # the inner runtime's exit code is the wrapper's
    assert recorded["pid"] == proc.pid  # execv: the same process
    assert recorded["stdin"] == "stdin for the container"
    assert recorded["fds"][str(read_end)] == "preserved fd payload"


def test_create_edits_the_spec_before_the_inner_runtime_runs(
    runtime_env: tuple[Path, Path], bundle: Path, tmp_path: Path
) -> None:
    config, record = runtime_env
    spec = json.loads((bundle / "config.json").read_text())
    spec["annotations"] = {DEVICES_ANNOTATION: "0000:03:00.0"}
    (bundle / "config.json").write_text(json.dumps(spec))
    result = run_wrapper(["create", "--bundle", str(bundle), "ctr1"], config, record)
    assert result.returncode == 0, result.stderr
    edited = json.loads((bundle / "config.json").read_text())
    assert MANIFEST_ANNOTATION in edited["annotations"]
    log = [json.loads(line) for line in (tmp_path / "kata-vfio.log").read_text().splitlines()]
    assert log[-1]["event"] == "spec edited"
    assert log[-1]["container_id"] == "ctr1" and log[-1]["devices"] == ["0000:03:00.0"]
    assert log[-1]["edit_ms"] > 0 and log[-1]["level"] == "info"


def podman_device(group: int) -> dict[str, Any]:
    return {"path": f"/dev/vfio/{group}", "type": "c", "major": 243, "minor": 0}


ERRORS = [
    ("bad-json", None, None, "is not valid JSON"),
    ("no-bundle", None, None, "bundle directory"),
    (
        "device-path",
        "/dev/vfio/../../etc",
        None,
        "'/dev/vfio/../../etc' is neither /dev/vfio/vfio nor /dev/vfio/<group number>",
    ),
    ("unknown-group", "/dev/vfio/99", None, "IOMMU group 99 does not exist on this host"),
    ("malformed-address", None, "0000:zz:00.0", "malformed PCI address '0000:zz:00.0'"),
    ("traversal-address", None, "../../../etc/passwd", "malformed PCI address"),
    ("unknown-address", None, "0000:09:00.0", "no PCI device 0000:09:00.0 on this host"),
    ("no-iommu-group", None, "0000:07:00.0", "boot the host with intel_iommu=on"),
    (
        "host-driver",
        None,
        "0000:05:00.0",
        "PCI device 0000:05:00.0 in IOMMU group 14 is bound to nvme, not vfio-pci; "
        "hand it to vfio-pci first: kata-vfio-ctl bind 0000:05:00.0",
    ),
]


@pytest.mark.parametrize(("case", "device_path", "address", "message"), ERRORS)
def test_bad_requests_fail_cleanly(
    runtime_env: tuple[Path, Path],
    bundle: Path,
    tmp_path: Path,
    case: str,
    device_path: str | None,
    address: str | None,
    message: str,
) -> None:
    config, record = runtime_env
    spec = json.loads((bundle / "config.json").read_text())
    if device_path:
        spec["linux"]["devices"] = [{"path": device_path, "type": "c", "major": 243, "minor": 0}]
    if address:
        spec["annotations"] = {DEVICES_ANNOTATION: address}
    # truncated JSON that asks for a device (a plain broken spec is the inner runtime's)
    text = (
        '{"annotations": {"io.kata-vfio.devices": "0000:03:00.0"'
        if case == "bad-json"
        else json.dumps(spec)
    )
    (bundle / "config.json").write_text(text)
    target = tmp_path / "missing" if case == "no-bundle" else bundle
    runtime_log = tmp_path / "runtime.log"
    result = run_wrapper(
        ["--log", str(runtime_log), "--log-format=json", "create", "--bundle", str(target), "ctr"],
        config,
        record,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kata-vfio: ")
    assert message in lines[0]
    assert (bundle / "config.json").read_text() == text  # byte-identical
    assert not record.exists()  # the inner runtime never started
    (entry,) = [json.loads(x) for x in runtime_log.read_text().splitlines()]
    assert entry["level"] == "error" and "kata-vfio: " + entry["msg"] == lines[0]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("runtime = 3\n", "runtime: 3 is not of type 'string'"),
        ("runtim = 'runc'\n", "Additional properties are not allowed"),
        ("runtime = \n", "is not valid TOML"),
        ("runtime = 'no-such-runtime-here'\n", "inner runtime 'no-such-runtime-here' not found"),
    ],
)
def test_bad_config_is_one_clear_line(
    tmp_path: Path, bundle: Path, content: str, message: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(content)
    record = tmp_path / "record.json"
    for verb in (["create", "--bundle", str(bundle), "c"], ["state", "c"]):
        result = run_wrapper(verb, config, record)
        assert result.returncode == 1
        assert len(result.stderr.splitlines()) == 1 and message in result.stderr
        assert not record.exists()


def test_passthrough_uses_cache_after_config_changes(
    runtime_env: tuple[Path, Path], tmp_path: Path
) -> None:
    config, record = runtime_env
    assert run_wrapper(["state", "x"], config, record).returncode == 0
    other = make_recorder(tmp_path / "..")  # a different inner runtime
    config.write_text(config.read_text().replace(str(tmp_path / "inner-runtime"), str(other)))
    assert run_wrapper(["state", "x"], config, record).returncode == 0
    assert json.loads(record.read_text())["argv"][0] == str(other)
