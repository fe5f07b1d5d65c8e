"""A pod's annotations reach the pod sandbox's spec too (containerd's pod_annotations,
CRI-O): the sandbox claims nothing and gets no manifest or nodes, only how Kata must start
the VM; the container that asked gets the devices. Both CRI engines' markers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kata_vfio.jsonlog import JsonLog
from kata_vfio.manifest import DEVICES_ANNOTATION, MANIFEST_ANNOTATION
from kata_vfio_host.allocate import SELECT_ANNOTATION
from kata_vfio_host.ledger import Host, read_journal_file
from kata_vfio_host.settings import Settings
from kata_vfio_runtime.lifecycle import prepare_bundle
from kata_vfio_runtime.spec_edit import KATA_CONFIG_PATH_ANNOTATION

from fakesys import FakeKernel, FakeSysfs

GENERATED = "/etc/kata-containers/configuration-kata-vfio.toml"
ENGINES = [
    ("io.kubernetes.cri.container-type", "sandbox", "container"),
    ("io.kubernetes.cri-o.ContainerType", "sandbox", "container"),
]


def bundle_with(tmp_path: Path, name: str, annotations: dict[str, str]) -> Path:
    b = tmp_path / "bundles" / name
    b.mkdir(parents=True)
    (b / "config.json").write_text(
        json.dumps(
            {
                "ociVersion": "1.0.2",
                "process": {"args": ["true"]},
                "root": {"path": "rootfs"},
                "annotations": annotations,
            }
        )
    )
    return b


def spec_of(b: Path) -> dict[str, Any]:
    return json.loads((b / "config.json").read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize(("key", "sandbox", "container"), ENGINES)
@pytest.mark.parametrize(
    "ask", [{DEVICES_ANNOTATION: "0000:03:00.0"}, {SELECT_ANNOTATION: "8086:10d3*1"}]
)
def test_the_pods_devices_go_to_its_container_not_its_sandbox(
    tmp_path: Path,
    vfio_host: FakeSysfs,
    key: str,
    sandbox: str,
    container: str,
    ask: dict[str, str],
) -> None:
    host = Host(vfio_host.root, tmp_path / "state", FakeKernel(vfio_host).write)
    settings = Settings(
        sysfs=str(vfio_host.root), state_dir=str(host.state_dir), kata_config_path=GENERATED
    )
    pod = {**ask, key: sandbox}
    sb = bundle_with(tmp_path, "pod1", pod)
    result = prepare_bundle("pod1", str(sb), settings, host, JsonLog(None))
    assert result.plan is None
    annotations = spec_of(sb)["annotations"]
    assert annotations[KATA_CONFIG_PATH_ANNOTATION] == GENERATED  # Kata starts the VM so
    assert MANIFEST_ANNOTATION not in annotations
    assert "devices" not in (spec_of(sb).get("linux") or {})
    assert read_journal_file(host).claims == {}

    app = bundle_with(tmp_path, "app1", {**ask, key: container})
    result = prepare_bundle("app1", str(app), settings, host, JsonLog(None))
    assert result.plan is not None and MANIFEST_ANNOTATION in spec_of(app)["annotations"]
    owners = {c.container for c in read_journal_file(host).claims.values()}
    assert owners == {"app1"}


def test_a_sandbox_of_a_pod_without_devices_is_left_alone(
    tmp_path: Path, vfio_host: FakeSysfs
) -> None:
    host = Host(vfio_host.root, tmp_path / "state", FakeKernel(vfio_host).write)
    settings = Settings(
        sysfs=str(vfio_host.root), state_dir=str(host.state_dir), kata_config_path=GENERATED
    )
    sb = bundle_with(tmp_path, "pod2", {"io.kubernetes.cri.container-type": "sandbox"})
    before = (sb / "config.json").read_bytes()
    assert not prepare_bundle("pod2", str(sb), settings, host, JsonLog(None)).written
    assert (sb / "config.json").read_bytes() == before
