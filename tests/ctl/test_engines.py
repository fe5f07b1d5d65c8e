"""containerd and CRI-O registration: what the engines will read, and exact reversal."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from kata_vfio.errors import ConfigError, KataVfioError, UsageError
from kata_vfio_ctl import engines
from kata_vfio_ctl.containerd_conf import (
    CONTAINERD_CONF,
    containerd_binary_version,
    register_containerd,
    registered_containerd,
    unregister_containerd,
)
from kata_vfio_ctl.crio_conf import CRIO_DROPIN, register_crio, unregister_crio
from kata_vfio_ctl.engine_shim import ShimRuntime

DATA = Path(__file__).resolve().parents[1] / "data"
SHIM = "/usr/local/bin/containerd-shim-kata-vfio-v2"
KATA_CONF = "/etc/kata-containers/kata-vfio.toml"

# Hand-written in the shape of containerd 2.x `config default` (version 3, single-quoted
# plugin keys, no blank line after [..runtimes]) with a site comment and a second runtime.
V3_SAMPLE = """\
version = 3
root = '/var/lib/containerd'
state = '/run/containerd'
imports = []

[grpc]
  address = '/run/containerd/containerd.sock'

[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'

  [plugins.'io.containerd.cri.v1.runtime']
    enable_cdi = true   # site setting, keep me
    cdi_spec_dirs = ['/etc/cdi', '/var/run/cdi']

    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'

      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes]
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
          runtime_type = 'io.containerd.runc.v2'
          pod_annotations = []
          privileged_without_host_devices = false

          [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
            SystemdCgroup = true

        # Kata as its package installs it
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.kata]
          runtime_type = 'io.containerd.kata.v2'

    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dir = '/opt/cni/bin'

  [plugins.'io.containerd.grpc.v1.cri']
    disable_tcp_service = true
"""

# What Debian's containerd package ships as /etc/containerd/config.toml
DEBIAN_ETC = """\
version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"""

SAMPLES = {
    "containerd-1.6-default": ((DATA / "containerd-1.6-default.toml").read_text(), 2),
    "debian-etc": (DEBIAN_ETC, 2),
    "containerd-2-v3": (V3_SAMPLE, 3),
    "v2-cri-only": (
        'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n'
        '  sandbox_image = "registry.k8s.io/pause:3.6"\n',
        2,
    ),
    "v2-no-plugins": ('version = 2\nroot = "/var/lib/containerd"  # moved\n', 2),
    "v1-no-version": ('[plugins.cri]\n  sandbox_image = "k8s.gcr.io/pause:3.2"\n', 1),
}
RUNTIMES = {1: ("cri",), 2: ("io.containerd.grpc.v1.cri",), 3: ("io.containerd.cri.v1.runtime",)}
RUNTIME_VARIANTS = {"bare": ShimRuntime(), "full": ShimRuntime(SHIM, KATA_CONF)}


def runtimes_of(text: str, version: int) -> dict[str, Any]:
    data = tomllib.loads(text)
    return data["plugins"][RUNTIMES[version][0]]["containerd"]["runtimes"]  # type: ignore[no-any-return]


def fake_containerd(tmp_path: Path, version_line: str) -> str:
    """A stand-in `containerd` binary that only answers --version."""
    path = tmp_path / "containerd"
    path.write_text(f"#!/bin/sh\necho '{version_line}'\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("variant", sorted(RUNTIME_VARIANTS))
@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_containerd_register_then_unregister_gives_the_same_bytes(
    tmp_path: Path, sample: str, variant: str
) -> None:
    original, version = SAMPLES[sample]
    runtime = RUNTIME_VARIANTS[variant]
    conf = tmp_path / "config.toml"
    conf.write_text(original)

    assert register_containerd(conf, runtime, containerd="/nonexistent/containerd")
    text = conf.read_text()
    runtimes = runtimes_of(text, version)
    ours = runtimes["kata-vfio"]
    assert ours["runtime_type"] == "io.containerd.kata-vfio.v2"
    assert ours["pod_annotations"] == ours["container_annotations"] == ["io.kata-vfio.*"]
    assert ours["privileged_without_host_devices"] is True
    if variant == "full":
        assert ours["runtime_path"] == SHIM
        assert ours["options"] == {"ConfigPath": KATA_CONF}
    else:
        assert "runtime_path" not in ours and "options" not in ours
    # everything else is still there, comments included
    after = tomllib.loads(text)
    del after["plugins"][RUNTIMES[version][0]]["containerd"]["runtimes"]["kata-vfio"]
    assert _without_empty(after) == _without_empty(tomllib.loads(original))
    for line in original.splitlines():
        assert line in text.splitlines()
    assert registered_containerd(conf) == ours

    assert not register_containerd(conf, runtime)  # idempotent, file untouched
    assert conf.read_text() == text
    assert unregister_containerd(conf)
    assert conf.read_bytes() == original.encode()
    assert not unregister_containerd(conf)
    assert registered_containerd(conf) is None


def _without_empty(data: dict[str, Any]) -> dict[str, Any]:
    """The parsed file without tables that are empty all the way down."""
    out = {}
    for key, value in data.items():
        kept = _without_empty(value) if isinstance(value, dict) else value
        if kept or not isinstance(value, dict):
            out[key] = kept
    return out


def test_reregistering_with_other_settings_still_unregisters_exactly(tmp_path: Path) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text(V3_SAMPLE)
    assert register_containerd(conf, ShimRuntime())
    assert register_containerd(conf, ShimRuntime(SHIM, KATA_CONF))
    assert registered_containerd(conf) == {
        "runtime_type": "io.containerd.kata-vfio.v2",
        "runtime_path": SHIM,
        "pod_annotations": ["io.kata-vfio.*"],
        "container_annotations": ["io.kata-vfio.*"],
        "privileged_without_host_devices": True,
        "options": {"ConfigPath": KATA_CONF},
    }
    assert unregister_containerd(conf)
    assert conf.read_text() == V3_SAMPLE


def test_new_runtime_lines_up_with_its_siblings(tmp_path: Path) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text(SAMPLES["containerd-1.6-default"][0])
    register_containerd(conf, ShimRuntime(SHIM, KATA_CONF))
    lines = conf.read_text().splitlines()
    head = lines.index(
        '        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata-vfio]'
        " # added by kata-vfio-ctl"
    )  # the mark: unregister takes out only what it added
    assert lines[head + 1] == '          runtime_type = "io.containerd.kata-vfio.v2"'
    assert '            ConfigPath = "/etc/kata-containers/kata-vfio.toml"' in lines
    # a blank line still separates the next table from ours
    nxt = next(
        i
        for i in range(head + 1, len(lines))
        if lines[i].lstrip().startswith("[") and "kata-vfio" not in lines[i]
    )
    assert lines[nxt - 1] == ""


@pytest.mark.parametrize(
    ("version_line", "version"),
    [
        ("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3", 2),
        ("containerd containerd.io 1.7.24 88bf19b2105c8b17560993bee28a01ddc2f97182", 2),
        (
            "containerd github.com/containerd/containerd/v2 v2.0.0 207ad711eabd375a01713109a8a197d",
            3,
        ),
    ],
)
def test_missing_file_is_created_for_the_installed_containerd_and_removed_again(
    tmp_path: Path, version_line: str, version: int
) -> None:
    conf = tmp_path / "etc/containerd/config.toml"
    containerd = fake_containerd(tmp_path, version_line)
    assert register_containerd(conf, ShimRuntime(), containerd=containerd)
    data = tomllib.loads(conf.read_text())
    assert data["version"] == version
    assert "kata-vfio" in runtimes_of(conf.read_text(), version)
    assert conf.read_text().startswith("# Created by kata-vfio-ctl")
    assert unregister_containerd(conf)
    assert not conf.exists()


@pytest.mark.parametrize("original", ["", "# nothing configured yet\n"])
def test_keyless_file_gets_a_marked_version_that_goes_again(tmp_path: Path, original: str) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text(original)
    containerd = fake_containerd(tmp_path, "containerd github.com/containerd/containerd 1.6.20")
    assert register_containerd(conf, ShimRuntime(), containerd=containerd)
    assert tomllib.loads(conf.read_text())["version"] == 2
    assert unregister_containerd(conf)
    assert conf.exists() and conf.read_text() == original


def test_containerd_version_parsing_and_failures(tmp_path: Path) -> None:
    assert containerd_binary_version(
        fake_containerd(tmp_path, "containerd github.com/containerd/containerd/v2 v2.1.3 c787fb98")
    ) == (2, 1)
    with pytest.raises(ConfigError, match="cannot read a version"):
        containerd_binary_version(fake_containerd(tmp_path, "containerd dev"))
    with pytest.raises(KataVfioError, match=r"containerd not found.*--config-version"):
        register_containerd(
            tmp_path / "new.toml", ShimRuntime(), containerd=str(tmp_path / "missing/containerd")
        )
    assert not (tmp_path / "new.toml").exists()
    # an explicit version needs no containerd at all
    assert register_containerd(
        tmp_path / "new.toml",
        ShimRuntime(),
        version=3,
        containerd=str(tmp_path / "missing/containerd"),
    )
    assert "kata-vfio" in runtimes_of((tmp_path / "new.toml").read_text(), 3)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version = 7\n", "unknown config version 7"),
        ('version = 2\n[plugins]\n"io.containerd.grpc.v1.cri" = 1\n', "is not a table"),
        ("version = [\n", "is not valid TOML"),
    ],
)
def test_unusable_containerd_config_is_refused_untouched(
    tmp_path: Path, text: str, message: str
) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text(text)
    with pytest.raises(ConfigError, match=message):
        register_containerd(conf, ShimRuntime())
    assert conf.read_text() == text


@pytest.mark.host
@pytest.mark.skipif(not shutil.which("containerd"), reason="needs containerd")
def test_real_containerd_reads_the_registration(tmp_path: Path) -> None:
    """containerd's own parser: `config default` output, registered, then `config dump`."""
    default = subprocess.run(
        ["containerd", "config", "default"], capture_output=True, text=True, check=True
    ).stdout
    conf = tmp_path / "config.toml"
    conf.write_text(default)
    register_containerd(conf, ShimRuntime(SHIM, KATA_CONF))
    dumped = subprocess.run(
        ["containerd", "--config", str(conf), "config", "dump"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    ours = tomllib.loads(dumped)["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"][
        "kata-vfio"
    ]
    assert ours["runtime_type"] == "io.containerd.kata-vfio.v2"
    assert ours["runtime_path"] == SHIM
    assert ours["pod_annotations"] == ours["container_annotations"] == ["io.kata-vfio.*"]
    assert ours["privileged_without_host_devices"] is True
    assert ours["options"] == {"ConfigPath": KATA_CONF}
    unregister_containerd(conf)
    assert conf.read_text() == default


# --- CRI-O ---------------------------------------------------------------------------


@pytest.fixture
def shim(tmp_path: Path) -> str:
    path = tmp_path / "bin" / "containerd-shim-kata-vfio-v2"
    path.parent.mkdir()
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return str(path)


def test_crio_dropin_is_what_crio_reads_and_goes_again(tmp_path: Path, shim: str) -> None:
    dropin = tmp_path / "etc/crio/crio.conf.d/50-kata-vfio.conf"
    assert register_crio(dropin, ShimRuntime(shim, KATA_CONF))
    data = tomllib.loads(dropin.read_text())
    assert data == {
        "crio": {
            "runtime": {
                "runtimes": {
                    "kata-vfio": {
                        "runtime_type": "vm",
                        "runtime_path": shim,
                        # issue 17 (a real CRI-O): without it CRI-O hands the shim FIFOs under the
                        # relative crio/fifo and every pod fails (test_crio.py)
                        "runtime_root": "/run/kata-vfio/crio",
                        "runtime_config_path": KATA_CONF,
                        "privileged_without_host_devices": True,
                    }
                }
            }
        }
    }
    # issue 16: CRI-O refuses an allowed_annotations entry it does not know ("invalid
    # allowed_annotation") and drops only its own annotations, by prefix: io.kata-vfio.*
    # (the device plugin's io.kata-vfio.resource.<name> too) pass as they are
    assert "allowed_annotations" not in dropin.read_text().replace("# no allowed_annotations", "")
    assert dropin.read_text().startswith("# kata-vfio:")
    assert oct(dropin.stat().st_mode & 0o777) == "0o644"
    assert not register_crio(dropin, ShimRuntime(shim, KATA_CONF))
    assert register_crio(dropin, ShimRuntime(shim))  # no Kata config: the shim's default
    assert (
        "runtime_config_path"
        not in tomllib.loads(dropin.read_text())["crio"]["runtime"]["runtimes"]["kata-vfio"]
    )
    assert unregister_crio(dropin)
    assert not dropin.exists()
    assert not unregister_crio(dropin)


def test_crio_quotes_awkward_paths(tmp_path: Path) -> None:
    odd = tmp_path / 'dir with "quotes" \\ and spaces'
    odd.mkdir()
    path = odd / "containerd-shim-kata-vfio-v2"
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    dropin = tmp_path / "50-kata-vfio.conf"
    register_crio(dropin, ShimRuntime(str(path)))
    assert tomllib.loads(dropin.read_text())["crio"]["runtime"]["runtimes"]["kata-vfio"][
        "runtime_path"
    ] == str(path)


def test_crio_refuses_a_shim_it_would_not_run(tmp_path: Path, shim: str) -> None:
    dropin = tmp_path / "50-kata-vfio.conf"
    other = Path(shim).with_name("kata-vfio-shim")
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    with pytest.raises(UsageError, match=r"only runs shims named containerd-shim-\*"):
        register_crio(dropin, ShimRuntime(str(other)))
    with pytest.raises(UsageError, match="not absolute"):
        register_crio(dropin, ShimRuntime("bin/containerd-shim-kata-vfio-v2"))
    os.chmod(shim, 0o644)
    with pytest.raises(ConfigError, match="not an executable file"):
        register_crio(dropin, ShimRuntime(shim))
    with pytest.raises(UsageError, match="absolute path"):
        register_crio(dropin, ShimRuntime())
    assert not dropin.exists()


# --- the command line ----------------------------------------------------------------


def ctl(*argv: str) -> int:
    """The subcommands as kata-vfio-ctl's main() runs them (errors -> exit code)."""
    parser = argparse.ArgumentParser()
    engines.add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KataVfioError as err:
        return err.exit_code


def test_command_line_round_trips(
    tmp_path: Path, shim: str, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text(DEBIAN_ETC)
    assert (
        ctl(
            "containerd-register",
            "--conf",
            str(conf),
            "--shim-path",
            shim,
            "--kata-config",
            KATA_CONF,
        )
        == 0
    )
    assert "registered runtime kata-vfio" in capsys.readouterr().out
    assert registered_containerd(conf)["runtime_path"] == shim  # type: ignore[index]
    assert ctl("containerd-unregister", "--conf", str(conf)) == 0
    assert conf.read_text() == DEBIAN_ETC

    dropin = tmp_path / "crio.conf.d/50-kata-vfio.conf"
    assert ctl("crio-register", "--dropin", str(dropin), "--shim-path", shim) == 0
    assert dropin.exists()
    assert ctl("crio-unregister", "--dropin", str(dropin)) == 0
    assert not dropin.exists()
    assert ctl("crio-register", "--dropin", str(dropin), "--shim-path", "/x/kata-shim") == 2
    assert (
        ctl(
            "containerd-register",
            "--conf",
            str(conf),
            "--config-version",
            "3",
            "--shim-path",
            "relative/containerd-shim-kata-vfio-v2",
        )
        == 2
    )


def test_install_and_uninstall_options(tmp_path: Path, shim: str) -> None:
    """What `kata-vfio-ctl install/uninstall --containerd --crio` run."""
    conf = tmp_path / "config.toml"
    conf.write_text(DEBIAN_ETC)
    dropin = tmp_path / "50-kata-vfio.conf"
    install = argparse.ArgumentParser()
    engines.add_install_options(install, install=True)
    args = install.parse_args(
        ["--containerd", str(conf), "--crio", str(dropin), "--shim-path", shim]
    )
    news = engines.install_engines(args, KATA_CONF)
    # issue 17: each registration says the engine must be restarted to see it
    assert news[0] == f"{conf}: registered kata-vfio; restart containerd to use it"
    assert news[-1] == f"{dropin}: written; restart CRI-O to use it"
    assert registered_containerd(conf)["options"] == {"ConfigPath": KATA_CONF}  # type: ignore[index]
    assert (
        tomllib.loads(dropin.read_text())["crio"]["runtime"]["runtimes"]["kata-vfio"][
            "runtime_config_path"
        ]
        == KATA_CONF
    )
    uninstall = argparse.ArgumentParser()
    engines.add_install_options(uninstall, install=False)
    args = uninstall.parse_args(["--containerd", str(conf), "--crio", str(dropin)])
    assert engines.uninstall_engines(args) == [f"{conf}: removed kata-vfio", f"{dropin}: removed"]
    assert conf.read_text() == DEBIAN_ETC and not dropin.exists()
    # the flags alone mean the standard places
    args = uninstall.parse_args(["--containerd", "--crio"])
    assert (args.containerd, args.crio) == (str(CONTAINERD_CONF), str(CRIO_DROPIN))
    assert engines.uninstall_engines(uninstall.parse_args([])) == []
