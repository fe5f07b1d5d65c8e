from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from kata_vfio.errors import ConfigError
from kata_vfio_ctl.main import main as ctl_main
from kata_vfio_ctl.podman_conf import DEFAULT_SUPPORTS_JSON, register, unregister

EXISTING = """\
# site settings, keep me
[containers]
log_driver = "k8s-file"  # inline comment

[engine]
runtime_supports_json = ["runc", "my-runtime"]

[engine.runtimes]
runc = ["/usr/sbin/runc"]
"""


def test_register_keeps_comments_and_is_idempotent(tmp_path: Path) -> None:
    conf = tmp_path / "containers.conf"
    conf.write_text(EXISTING)
    assert register(conf, "/opt/kata-vfio/bin/kata-vfio")
    text = conf.read_text()
    assert "# site settings, keep me" in text and "# inline comment" in text
    data = tomllib.loads(text)
    assert data["engine"]["runtimes"] == {
        "runc": ["/usr/sbin/runc"],
        "kata-vfio": ["/opt/kata-vfio/bin/kata-vfio"],
    }
    assert data["engine"]["runtime_supports_json"] == ["runc", "my-runtime", "kata-vfio"]
    assert "kata-runtime" in data["engine"]["runtime_supports_kvm"]
    assert data["engine"]["runtime_supports_kvm"][-1] == "kata-vfio"
    assert not register(conf, "/opt/kata-vfio/bin/kata-vfio")
    assert conf.read_text() == text
    assert unregister(conf)
    data = tomllib.loads(conf.read_text())
    assert "kata-vfio" not in data["engine"]["runtimes"]
    assert data["engine"]["runtime_supports_json"] == ["runc", "my-runtime"]
    assert "# site settings, keep me" in conf.read_text()
    assert not unregister(conf)


def test_register_into_a_new_file_keeps_podman_defaults(tmp_path: Path) -> None:
    conf = tmp_path / "etc/containers/containers.conf"
    assert ctl_main(["podman-register", "--conf", str(conf), "--runtime-path", "/x/kata-vfio"]) == 0
    data = tomllib.loads(conf.read_text())
    assert data["engine"]["runtime_supports_json"] == [*DEFAULT_SUPPORTS_JSON, "kata-vfio"]


def test_distribution_file_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="belongs to the distribution"):
        register(Path("/usr/share/containers/containers.conf"), "/x")
    assert ctl_main(["podman-register", "--conf", "/usr/share/containers/containers.conf"]) == 1
    assert "belongs to the distribution" in capsys.readouterr().err
