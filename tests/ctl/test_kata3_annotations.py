"""The wrapper's Kata >= 2 annotations: io.katacontainers.config_path (and vfio_mode for
guest = "agent") instead of the gated guest_hook_path; Kata 1.x stays as it was."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kata_vfio.errors import ConfigError
from kata_vfio.manifest import DEVICES_ANNOTATION, GUEST_HOOK_PATH_ANNOTATION, MANIFEST_ANNOTATION
from kata_vfio_host.settings import Settings, load_settings
from kata_vfio_runtime.spec_edit import (
    KATA_CONFIG_PATH_ANNOTATION,
    KATA_VFIO_MODE_ANNOTATION,
    edit_bundle,
    plan_edit,
)

from fakesys import FakeSysfs

GENERATED = "/etc/kata-containers/configuration-kata-vfio.toml"
GATED_PREFIX = "io.katacontainers.config.hypervisor."


def spec_asking_for(address: str) -> dict[str, Any]:
    return {"ociVersion": "1.0.2", "annotations": {DEVICES_ANNOTATION: address}}


def test_kata1_default_keeps_the_guest_hook_path_annotation(vfio_host: FakeSysfs) -> None:
    plan = plan_edit(spec_asking_for("0000:03:00.0"), Settings(sysfs=str(vfio_host.root)))
    assert plan is not None
    assert plan.annotations[GUEST_HOOK_PATH_ANNOTATION] == "/usr/share/oci/hooks"
    assert KATA_CONFIG_PATH_ANNOTATION not in plan.annotations
    assert KATA_VFIO_MODE_ANNOTATION not in plan.annotations


@pytest.mark.parametrize(("guest", "vfio_mode"), [("hook", None), ("agent", "vfio")])
def test_kata3_names_the_generated_file_and_no_gated_key(
    vfio_host: FakeSysfs, guest: str, vfio_mode: str | None
) -> None:
    settings = Settings(sysfs=str(vfio_host.root), guest=guest, kata_config_path=GENERATED)
    plan = plan_edit(spec_asking_for("0000:03:00.0"), settings)
    assert plan is not None
    assert plan.annotations[KATA_CONFIG_PATH_ANNOTATION] == GENERATED
    assert plan.annotations.get(KATA_VFIO_MODE_ANNOTATION) == vfio_mode
    assert not [k for k in plan.annotations if k.startswith(GATED_PREFIX)]
    assert MANIFEST_ANNOTATION in plan.annotations


def test_kata3_edit_of_a_bundle(vfio_host: FakeSysfs, bundle: Path) -> None:
    spec = json.loads((bundle / "config.json").read_text())
    # a config_path the container brought is replaced for a VFIO container
    spec["annotations"] = {
        DEVICES_ANNOTATION: "0000:04:00.0",
        KATA_CONFIG_PATH_ANNOTATION: "/tmp/evil.toml",
    }
    (bundle / "config.json").write_text(json.dumps(spec))
    settings = Settings(sysfs=str(vfio_host.root), guest="agent", kata_config_path=GENERATED)
    assert edit_bundle(bundle, settings).written
    annotations = json.loads((bundle / "config.json").read_text())["annotations"]
    assert annotations[KATA_CONFIG_PATH_ANNOTATION] == GENERATED
    assert annotations[KATA_VFIO_MODE_ANNOTATION] == "vfio"
    assert GUEST_HOOK_PATH_ANNOTATION not in annotations


def test_a_container_without_vfio_gets_no_kata3_annotations(
    vfio_host: FakeSysfs, bundle: Path
) -> None:
    before = (bundle / "config.json").read_bytes()
    settings = Settings(sysfs=str(vfio_host.root), kata_config_path=GENERATED)
    assert not edit_bundle(bundle, settings).written
    assert (bundle / "config.json").read_bytes() == before


def test_config_toml_guest_and_kata_config_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("kata_vfio_host.cache.CACHE_DIR", str(tmp_path / "cache"))
    conf = tmp_path / "config.toml"
    conf.write_text(f'guest = "agent"\nkata_config_path = "{GENERATED}"\n')
    settings = load_settings(str(conf))
    assert (settings.guest, settings.kata_config_path) == ("agent", GENERATED)
    assert load_settings(str(conf)) == settings  # and through the settings cache
    defaults = tmp_path / "defaults.toml"
    defaults.write_text('runtime = "kata-runtime"\n')
    assert (load_settings(str(defaults)).guest, load_settings(str(defaults)).kata_config_path) == (
        "hook",
        "",
    )
    for bad in ('guest = "kernel"\n', 'kata_config_path = "relative.toml"\n'):
        conf.write_text(bad)
        with pytest.raises(ConfigError):
            load_settings(str(conf))
