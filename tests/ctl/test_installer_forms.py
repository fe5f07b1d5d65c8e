"""Every installer gives back exactly the bytes it found, whatever form the file has.

A table of file forms (CRLF, no final newline, a symbolic link, comments, dotted keys,
inline tables, arrays of tables, empty, missing) × installers (podman's containers.conf,
containerd's config.toml, Kata 1.x's configuration.toml edited in place, kata-vfio's own
config.toml that Kata >= 2's install names the generated file in): either the install
takes, the engine reads it, and the uninstall gives back the very bytes (a link stays a link);
or the install is refused with a KataVfioError before anything is written. Never an
internal error, never a changed file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from kata_vfio.errors import KataVfioError
from kata_vfio_ctl import kata_conf, podman_conf
from kata_vfio_ctl.containerd_conf import (
    register_containerd,
    registered_containerd,
    unregister_containerd,
)
from kata_vfio_ctl.engine_shim import ShimRuntime
from kata_vfio_ctl.kata3 import GENERATED_NAME, install_kata, uninstall_kata
from kata_vfio_ctl.main import main as ctl_main
from kata_vfio_host.settings import Settings

SHIM = "/usr/local/bin/containerd-shim-kata-vfio-v2"
KATA_CONF = "/etc/kata-containers/kata-vfio.toml"
RUNTIME = "/opt/kata-vfio/bin/kata-vfio"
HOOKS = "/usr/share/oci/hooks"

KATA3 = """\
[hypervisor.qemu]
path = "/opt/kata/bin/qemu-system-x86_64"
image = "/opt/kata/share/kata-containers/kata-containers.img"
hot_plug_vfio = "no-port"

[runtime]
vfio_mode = "guest-kernel"
"""


@dataclass(frozen=True)
class Installer:
    samples: dict[str, str]  # layout -> file text (LF, final newline)
    install: Callable[[Path, Path], None]
    uninstall: Callable[[Path, Path], None]
    installed: Callable[[Path, Path], bool]  # what the engine reads says it took
    must_take: frozenset[str]  # layouts that must be installed, not refused


def containerd_install(conf: Path, tmp: Path) -> None:
    register_containerd(conf, ShimRuntime(SHIM, KATA_CONF), containerd=_containerd(tmp))


def _containerd(tmp: Path) -> str:
    """A containerd that answers --version as Debian's 1.6 (for files naming no version)."""
    fake = tmp / "containerd-version"
    fake.write_text("#!/bin/sh\necho 'containerd github.com/containerd/containerd 1.6.20'\n")
    fake.chmod(0o755)
    return str(fake)


def containerd_installed(conf: Path, tmp: Path) -> bool:
    ours = registered_containerd(conf) or {}
    return ours.get("runtime_path") == SHIM and ours.get("options") == {"ConfigPath": KATA_CONF}


def podman_installed(conf: Path, tmp: Path) -> bool:
    engine = tomllib.loads(conf.read_text()).get("engine", {})
    return bool(
        engine["runtimes"]["kata-vfio"] == [RUNTIME]
        and "kata-vfio" in engine["runtime_supports_json"]
        and "kata-vfio" in engine["runtime_supports_kvm"]
    )


def kata1_installed(conf: Path, tmp: Path) -> bool:
    return all(ok for _, ok, _ in kata_conf.check(conf, HOOKS, {}))


def _kata3(tmp: Path) -> Path:
    installed = tmp / "kata" / "configuration.toml"
    if not installed.exists():
        installed.parent.mkdir()
        installed.write_text(KATA3)
    return installed


def kata3_install(conf: Path, tmp: Path) -> None:
    install_kata(_kata3(tmp), Settings(), conf, tmp / "state", kata_version="3.30")


def kata3_uninstall(conf: Path, tmp: Path) -> None:
    uninstall_kata(_kata3(tmp), Settings(), conf, tmp / "state")


def kata3_installed(conf: Path, tmp: Path) -> bool:
    return bool(
        tomllib.loads(conf.read_text())["kata_config_path"]
        == str(_kata3(tmp).with_name(GENERATED_NAME))
    )


INSTALLERS = {
    "podman": Installer(
        samples={
            "tables": '# site settings\n[containers]\nlog_driver = "k8s-file"  # keep\n\n'
            '[engine]\nruntime_supports_json = [\n  "runc",\n  "crun",\n]\n\n'
            '[engine.runtimes]\nrunc = ["/usr/sbin/runc"]\n',
            "no-engine": '[containers]\nlog_driver = "k8s-file"\n',
            "dotted": '[engine]\nruntimes.runc = ["/usr/sbin/runc"]  # dotted\n',
            "top-dotted": 'engine.runtimes.runc = ["/usr/sbin/runc"]\n',
            "inline": '[engine]\nruntimes = { runc = ["/usr/sbin/runc"] }\n',
            "array-of-tables": '[engine]\ncgroup_manager = "cgroupfs"\n\n'
            '[[engine.x]]\nname = "a"\n\n[[engine.x]]\nname = "b"\n',
            "empty": "",
        },
        install=lambda conf, tmp: podman_conf.register(conf, RUNTIME) and None,
        uninstall=lambda conf, tmp: podman_conf.unregister(conf) and None,
        installed=podman_installed,
        must_take=frozenset({"tables", "no-engine", "array-of-tables", "empty"}),
    ),
    "containerd": Installer(
        samples={
            "tables": "version = 2\n\n# site comment\n[plugins]\n"
            '  [plugins."io.containerd.grpc.v1.cri"]\n'
            '    sandbox_image = "pause:3.6"  # keep\n'
            '    [plugins."io.containerd.grpc.v1.cri".containerd]\n'
            '      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes]\n'
            '        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
            '          runtime_type = "io.containerd.runc.v2"\n',
            "dotted": 'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n'
            '  containerd.runtimes.runc.runtime_type = "io.containerd.runc.v2"\n',
            "dotted-containerd": 'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n'
            '  runtimes.runc.runtime_type = "io.containerd.runc.v2"\n',
            "top-dotted": "version = 2\n"
            'plugins."io.containerd.grpc.v1.cri".sandbox_image = "pause:3.6"\n',
            "inline": 'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n'
            '  runtimes = { runc = { runtime_type = "io.containerd.runc.v2" } }\n',
            "array-of-tables": 'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n'
            '  sandbox_image = "pause:3.6"\n\n[[x]]\n  name = "a"\n',
            "empty": "",
        },
        install=containerd_install,
        uninstall=lambda conf, tmp: unregister_containerd(conf) and None,
        installed=containerd_installed,
        must_take=frozenset(
            {"tables", "dotted", "dotted-containerd", "top-dotted", "array-of-tables", "empty"}
        ),
    ),
    "kata1": Installer(
        samples={
            "tables": '# Kata 1.x\n[hypervisor.qemu]\npath = "/usr/bin/qemu"\n'
            'machine_type = "pc"  # was\nkernel_params = "quiet"\n'
            'enable_annotations = [\n  "enable_iommu",\n]\n\n'
            '[proxy.kata]\npath = "/usr/libexec/kata-proxy"\n',
            "dotted": '[hypervisor]\nqemu.path = "/usr/bin/qemu"\nqemu.machine_type = "pc"\n',
            "inline": 'hypervisor = { qemu = { path = "/usr/bin/qemu" } }\n',
            "array-of-tables": '[hypervisor.qemu]\npath = "/usr/bin/qemu"\n\n[[x]]\nname = "a"\n',
        },
        install=lambda conf, tmp: kata_conf.install(conf, tmp / "state", HOOKS, {}) and None,
        uninstall=lambda conf, tmp: kata_conf.uninstall(conf, tmp / "state") and None,
        installed=kata1_installed,
        must_take=frozenset({"tables", "array-of-tables"}),
    ),
    "kata3-config.toml": Installer(
        samples={
            "tables": '# kata-vfio\nruntime = "kata-runtime"  # keep\n\n[annotations]\n'
            '"io.example" = "1"\n',
            "dotted": 'annotations."io.example" = "1"\n',
            "inline": 'annotations = { "io.example" = "1" }\n',
            "array-of-tables": 'runtime = "kata-runtime"\n\n[[x]]\nname = "a"\n',
            "empty": "",
        },
        install=kata3_install,
        uninstall=kata3_uninstall,
        installed=kata3_installed,
        must_take=frozenset({"tables", "dotted", "inline", "array-of-tables", "empty"}),
    ),
}

# how a sample is written to disk: (bytes from the sample, the form must always take)
FORMS: dict[str, Callable[[str], bytes]] = {
    "lf": lambda text: text.encode(),
    "crlf": lambda text: text.replace("\n", "\r\n").encode(),
    "no-final-newline": lambda text: text.rstrip("\n").encode(),
    "crlf-no-final-newline": lambda text: text.rstrip("\n").replace("\n", "\r\n").encode(),
    "symlink": lambda text: text.encode(),
}

CASES = [
    (name, layout, form)
    for name, inst in INSTALLERS.items()
    for layout in inst.samples
    for form in FORMS
    if not (layout == "empty" and form != "lf")
]


@pytest.mark.parametrize(("installer", "layout", "form"), CASES)
def test_install_then_uninstall_gives_back_the_bytes_or_is_refused(
    tmp_path: Path, installer: str, layout: str, form: str
) -> None:
    inst = INSTALLERS[installer]
    original = FORMS[form](inst.samples[layout])
    conf = tmp_path / "etc" / "file.toml"
    conf.parent.mkdir()
    target = conf
    if form == "symlink":
        target = tmp_path / "elsewhere" / "real.toml"
        target.parent.mkdir()
        conf.symlink_to(target)
    target.write_bytes(original)
    try:
        inst.install(conf, tmp_path)
    except KataVfioError as err:
        assert layout not in inst.must_take, f"refused: {err}"
        assert "\n" not in str(err) and str(conf) in str(err)
        assert target.read_bytes() == original
        assert conf.is_symlink() == (form == "symlink")
        return
    assert conf.is_symlink() == (form == "symlink")  # a link stays a link
    assert target.read_bytes() != original and inst.installed(conf, tmp_path)
    if b"\r\n" in original:  # the file keeps its form: no lone LF
        assert b"\n" not in target.read_bytes().replace(b"\r\n", b"")
    if form.endswith("no-final-newline"):
        assert not target.read_bytes().endswith(b"\n")
    inst.uninstall(conf, tmp_path)
    assert conf.is_symlink() == (form == "symlink")
    assert target.read_bytes() == original


@pytest.mark.parametrize("installer", ["podman", "containerd", "kata3-config.toml"])
def test_a_missing_file_is_created_and_removed_again(tmp_path: Path, installer: str) -> None:
    inst = INSTALLERS[installer]
    conf = tmp_path / "etc" / "file.toml"
    inst.install(conf, tmp_path)
    assert inst.installed(conf, tmp_path)
    inst.uninstall(conf, tmp_path)
    assert not conf.exists()


@pytest.mark.host
@pytest.mark.skipif(
    not shutil.which("containerd") and not os.environ.get("KATA_VFIO_NO_SKIPS"),
    reason="needs containerd",
)
@pytest.mark.parametrize("form", ["lf", "crlf", "no-final-newline"])
@pytest.mark.parametrize(
    "layout", ["tables", "dotted", "dotted-containerd", "top-dotted", "array-of-tables"]
)
def test_real_containerd_reads_the_registration_in_every_layout(
    tmp_path: Path, layout: str, form: str
) -> None:
    """containerd 1.6's own parser (`containerd -c FILE config dump`) on each layout."""
    conf = tmp_path / "config.toml"
    original = FORMS[form](INSTALLERS["containerd"].samples[layout])
    conf.write_bytes(original)
    containerd_install(conf, tmp_path)
    dumped = subprocess.run(
        ["containerd", "-c", str(conf), "config", "dump"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    ours = tomllib.loads(dumped)["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"][
        "kata-vfio"
    ]
    assert ours["runtime_type"] == "io.containerd.kata-vfio.v2"
    assert ours["runtime_path"] == SHIM and ours["options"] == {"ConfigPath": KATA_CONF}
    assert ours["pod_annotations"] == ours["container_annotations"] == ["io.kata-vfio.*"]
    unregister_containerd(conf)
    assert conf.read_bytes() == original


@pytest.mark.parametrize(
    "argv",
    [
        ["containerd-register", "--config-version", "2"],
        ["podman-register", "--runtime-path", RUNTIME],
    ],
)
def test_a_layout_that_cannot_be_edited_is_one_line_not_an_internal_error(
    tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    name = "containerd" if argv[0].startswith("containerd") else "podman"
    conf = tmp_path / "file.toml"
    original = INSTALLERS[name].samples["inline"].replace("\n", "\r\n").encode()
    conf.write_bytes(original)
    assert ctl_main([argv[0], "--conf", str(conf), *argv[1:]]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot add" in err[0] and "Traceback" not in err[0], err
    assert conf.read_bytes() == original
