"""The generated Kata >= 2 configuration and the wrapper's edited spec, checked together
against Kata's documented rules (tests/kata3/rules.py) — what `make test` can check without
Kata's own loader, which no registry here serves (make test-kata runs that one:
tests/e2e/test_kata3_real.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kata3.rules import CONFIG_PATH, sandbox
from kata_vfio.manifest import DEVICES_ANNOTATION, GUEST_HOOK_PATH_ANNOTATION
from kata_vfio_ctl.kata3 import GENERATED_NAME, install_kata
from kata_vfio_host.settings import Settings
from kata_vfio_runtime.spec_edit import edit_bundle
from test_kata3_conf import KATA2, KATA3, fake_runtime

from fakesys import FakeSysfs

HOOKS = "/usr/share/oci/hooks"
EXTRA = {"io.katacontainers.config.hypervisor.enable_iommu": "true"}


def installed(tmp_path: Path, text: str) -> Path:
    kata = tmp_path / "etc/kata-containers/configuration.toml"
    kata.parent.mkdir(parents=True, exist_ok=True)
    kata.write_text(text)
    return kata


def generate(
    tmp_path: Path, text: str, version: str, guest: str, annotations: dict[str, str] | None = None
) -> tuple[Path, Path]:
    """`kata-vfio-ctl install`'s step: (installed file, generated file)."""
    kata = installed(tmp_path, text)
    settings = Settings(guest=guest, annotations=annotations or {})
    result = install_kata(
        kata,
        settings,
        tmp_path / "config.toml",
        tmp_path / "state",
        runtimes=fake_runtime(tmp_path, version),
    )
    assert result.generated == kata.with_name(GENERATED_NAME)
    return kata, result.generated


def edited_spec(bundle: Path, host: FakeSysfs, settings: Settings) -> dict[str, Any]:
    """config.json as the wrapper leaves it for a container asking for two groups."""
    spec = json.loads((bundle / "config.json").read_text())
    spec["annotations"] = {DEVICES_ANNOTATION: "0000:03:00.0,0000:04:00.0"}
    (bundle / "config.json").write_text(json.dumps(spec))
    assert edit_bundle(bundle, settings).written
    return json.loads((bundle / "config.json").read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize("annotations", [{}, EXTRA])
@pytest.mark.parametrize("guest", ["hook", "agent"])
def test_generated_configuration_and_edited_spec_pass_kata3s_rules(
    tmp_path: Path, bundle: Path, vfio_host: FakeSysfs, guest: str, annotations: dict[str, str]
) -> None:
    kata, generated = generate(tmp_path, KATA3, "3.30.0", guest, annotations)
    settings = Settings(
        sysfs=str(vfio_host.root),
        guest=guest,
        annotations=annotations,
        kata_config_path=str(generated),
    )
    spec = edited_spec(bundle, vfio_host, settings)
    seen = sandbox(spec, kata, release=(3, 30))
    assert seen.problems == []
    assert seen.config == generated  # the config_path annotation chose the generated file
    assert len(seen.vfio_devices) == 2
    hv = seen.hypervisor
    assert (hv["machine_type"], hv["enable_iommu"], hv["hot_plug_vfio"]) == (
        "q35",
        True,
        "root-port",
    )
    assert hv["pcie_root_port"] >= len(seen.vfio_devices)
    if guest == "hook":
        assert (seen.vfio_mode, hv["guest_hook_path"]) == ("guest-kernel", HOOKS)
    else:
        assert (seen.vfio_mode, hv["guest_hook_path"]) == ("vfio", "")


def test_stock_kata3_refuses_the_kata1_style_annotation(
    tmp_path: Path, bundle: Path, vfio_host: FakeSysfs
) -> None:
    """Why the generated file exists: with the stock file and the wrapper's Kata 1.x
    default (the guest_hook_path annotation) Kata >= 2 refuses the container."""
    kata = installed(tmp_path, KATA3)
    spec = edited_spec(bundle, vfio_host, Settings(sysfs=str(vfio_host.root)))
    assert GUEST_HOOK_PATH_ANNOTATION in spec["annotations"]
    assert CONFIG_PATH not in spec["annotations"]
    seen = sandbox(spec, kata, release=(3, 30))
    assert f"annotation {GUEST_HOOK_PATH_ANNOTATION} is not enabled" in seen.refusals("kata")
    # and even without it the stock file plugs no VFIO device
    assert "Incorrect hot plug configuration no-port" in seen.refusals("kata")


def test_older_kata2_generated_file_gives_each_device_its_root_port(
    tmp_path: Path, vfio_host: FakeSysfs
) -> None:
    kata, generated = generate(tmp_path, KATA2, "2.2.3", "hook")
    stock = sandbox(
        edited_spec(
            new_bundle(tmp_path / "b1"),
            vfio_host,
            Settings(sysfs=str(vfio_host.root), guest_hook_path=HOOKS),
        ),
        kata,
        release=(2, 2),
    )
    assert any("one guest IOMMU group" in p for p in stock.refusals("path"))
    settings = Settings(sysfs=str(vfio_host.root), kata_config_path=str(generated))
    seen = sandbox(
        edited_spec(new_bundle(tmp_path / "b2"), vfio_host, settings), kata, release=(2, 2)
    )
    assert seen.problems == [] and seen.config == generated


def new_bundle(path: Path) -> Path:
    (path / "rootfs").mkdir(parents=True)
    subprocess.run(["runc", "spec", "--bundle", str(path)], check=True)
    return path


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (("enable_iommu = true", "enable_iommu = false"), "no guest IOMMU"),
        (
            ('hot_plug_vfio = "root-port"', 'hot_plug_vfio = "no-port"'),
            "Incorrect hot plug configuration",
        ),
        (('machine_type = "q35"', 'machine_type = "pc"'), "needs machine_type q35"),
        (('guest_hook_path = "/usr/share/oci/hooks"', 'guest_hook_path = ""'), "no nodes"),
    ],
)
def test_the_rules_notice_a_generated_file_that_lost_a_setting(
    tmp_path: Path, bundle: Path, vfio_host: FakeSysfs, change: tuple[str, str], problem: str
) -> None:
    """The model is no rubber stamp: each setting the generated file carries is needed."""
    kata, generated = generate(tmp_path, KATA3, "3.30.0", "hook")
    text = generated.read_text()
    assert change[0] in text
    generated.write_text(text.replace(change[0], change[1]))
    settings = Settings(sysfs=str(vfio_host.root), kata_config_path=str(generated))
    seen = sandbox(edited_spec(bundle, vfio_host, settings), kata, release=(3, 30))
    assert any(problem in p for p in seen.refusals()), seen.problems
