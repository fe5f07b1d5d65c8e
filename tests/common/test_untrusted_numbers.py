"""Untrusted numbers are read with ASCII-only grammars and must be finite: another script's
digits, superscripts, thousands of digits and NaN are each one clear refusal, never an
internal error (exit 70) nor a value that slips through."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kata_vfio.errors import ConfigError, DeviceError
from kata_vfio.manifest import DEVICES_ANNOTATION
from kata_vfio_host.allocate import parse_select
from kata_vfio_host.settings import load_settings
from kata_vfio_host.vfconfig import parse_vf_config

from fakesys import FakeSysfs
from wrapper_run import make_recorder, run_wrapper, write_config

OTHER_DIGITS = ["\u0662", "\u00b2", "\u0966", "\uff13", "1\u0660"]  # ٢ ² ० ３ 1٠


@pytest.mark.parametrize("count", [*OTHER_DIGITS, "9" * 5000, "0" * 40 + "1", "257"])
def test_a_select_count_is_ascii_digits_and_bounded(count: str) -> None:
    with pytest.raises(DeviceError, match=r"io\.kata-vfio\.select") as err:
        parse_select(f"1b36:0010*{count}")
    assert len(str(err.value)) < 200  # thousands of digits are not echoed back


def test_a_leading_zero_count_within_bounds_is_still_a_count() -> None:
    assert parse_select("1b36:0010*02")[0].wanted == 2


@pytest.mark.parametrize("vlan", [*OTHER_DIGITS, "1" * 5000, "-1", "+5", " 5"])
def test_a_vlan_is_ascii_digits_and_bounded(vlan: str) -> None:
    with pytest.raises(DeviceError, match=r"vlan=0\.\.4095"):
        parse_vf_config(f"0000:3b:02.0 vlan={vlan}")


@pytest.mark.parametrize(
    "mac", ["00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff", "52:54:00:12:34:5\u0666"]
)
def test_a_mac_that_sets_no_unicast_address_is_refused(mac: str) -> None:
    with pytest.raises(DeviceError, match="not a unicast MAC"):
        parse_vf_config(f"0000:3b:02.0 mac={mac}")


@pytest.mark.parametrize("value", ["nan", "+nan", "-nan", "inf", "-inf"])
def test_a_non_finite_hotplug_timeout_is_refused_at_load(tmp_path: Path, value: str) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text(f"hotplug_timeout = {value}\n")
    with pytest.raises(ConfigError, match="hotplug_timeout"):
        load_settings(str(conf))


def test_a_nan_timeout_reaches_no_manifest(
    tmp_path: Path, vfio_host: FakeSysfs, bundle: Path
) -> None:
    config = write_config(
        tmp_path,
        runtime=str(make_recorder(tmp_path)),
        sysfs=str(vfio_host.root),
        log_file=str(tmp_path / "log"),
    )
    config.write_text(config.read_text() + "hotplug_timeout = nan\n")
    spec = json.loads((bundle / "config.json").read_text())
    spec["annotations"] = {DEVICES_ANNOTATION: "0000:03:00.0"}
    (bundle / "config.json").write_text(json.dumps(spec))
    before = (bundle / "config.json").read_bytes()
    record = tmp_path / "record.json"
    result = run_wrapper(["create", "--bundle", str(bundle), "c1"], config, record)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "hotplug_timeout: nan is not a number of seconds" in lines[0]
    assert (bundle / "config.json").read_bytes() == before and not record.exists()
