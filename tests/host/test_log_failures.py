"""Logging never decides the outcome of a verb: with the log file on a full filesystem
(/dev/full: every write fails with ENOSPC) or unopenable, each verb does its whole work and
exits as it would with a log; the lines are dropped (counted; kata-vfio-ctl says so once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kata_vfio.jsonlog import JsonLog
from kata_vfio.manifest import DEVICES_ANNOTATION, MANIFEST_ANNOTATION
from kata_vfio_ctl.main import main as ctl
from kata_vfio_host.ledger import Host, read_journal
from ledgerfiles import claims

from fakesys import FakeKernel, FakeSysfs
from wrapper_run import make_recorder, run_wrapper, write_config

FULL = "/dev/full"


@pytest.mark.parametrize("log_file", [FULL, "/nonexistent-dir/kata-vfio.log"])
def test_create_does_its_whole_work_when_the_log_cannot_be_written(
    tmp_path: Path, vfio_host: FakeSysfs, bundle: Path, log_file: str
) -> None:
    config = write_config(
        tmp_path, runtime=str(make_recorder(tmp_path)), sysfs=str(vfio_host.root), log_file=log_file
    )
    spec = json.loads((bundle / "config.json").read_text())
    spec["annotations"] = {DEVICES_ANNOTATION: "0000:03:00.0"}
    (bundle / "config.json").write_text(json.dumps(spec))
    record = tmp_path / "record.json"
    result = run_wrapper(["create", "--bundle", str(bundle), "ctr1"], config, record)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert record.exists()  # the inner runtime ran
    assert MANIFEST_ANNOTATION in json.loads((bundle / "config.json").read_text())["annotations"]
    assert "ctr1" in {c["container"] for c in claims(tmp_path / "state").values()}  # claimed
    # and delete gives it back as usual
    gone = run_wrapper(["delete", "ctr1"], config, record)
    assert gone.returncode == 0, gone.stderr


def test_a_dropped_line_is_counted_not_raised(tmp_path: Path) -> None:
    before = JsonLog.dropped
    log = JsonLog(FULL, {"container_id": "c"})
    log.info("one")
    log.bind(step="x").error("two")
    assert JsonLog.dropped == before + 2
    fine = tmp_path / "log"
    JsonLog(str(fine)).info("three")
    assert JsonLog.dropped == before + 2 and json.loads(fine.read_text())["event"] == "three"


@pytest.fixture
def full_log_host(
    vfio_host: FakeSysfs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[FakeSysfs, Host]:
    import kata_vfio_ctl.base

    config = tmp_path / "kv.toml"
    config.write_text(
        f'runtime = "/bin/true"\nsysfs = "{vfio_host.root}"\n'
        f'state_dir = "{tmp_path / "state"}"\nlog_file = "{FULL}"\n'
    )
    monkeypatch.setenv("KATA_VFIO_CONFIG", str(config))
    kernel = FakeKernel(vfio_host)
    host = Host(sysfs=vfio_host.root, state_dir=tmp_path / "state", write=kernel.write)
    monkeypatch.setattr(kata_vfio_ctl.base, "_host", lambda args: host)
    return vfio_host, host


def test_bind_and_restore_all_succeed_and_say_once_that_the_log_is_lost(
    full_log_host: tuple[FakeSysfs, Host], capsys: pytest.CaptureFixture[str]
) -> None:
    fs, host = full_log_host
    assert ctl(["bind", "--timeout", "0", "0000:05:00.0"]) == 0
    err = capsys.readouterr().err
    assert fs.driver("0000:05:00.0") == "vfio-pci" and "0000:05:00.0" in read_journal(host)
    assert err.count(f"cannot write the log {FULL}") == 1, err
    assert "No space left on device" in err and "Traceback" not in err
    assert ctl(["restore", "--all"]) == 0
    out, err = capsys.readouterr()
    assert fs.driver("0000:05:00.0") == "nvme" and "0000:05:00.0: given back" in out
    assert err.count(f"cannot write the log {FULL}") == 1, err
