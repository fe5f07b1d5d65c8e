"""Kata >= 2: the generated configuration-kata-vfio.toml (install / uninstall), how the Kata
release is told, and doctor's Kata 3.x checks. Kata's own parser: test_kata3_real.py."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from kata_vfio.errors import ConfigError
from kata_vfio_ctl.checks import FAIL, OK, WARN
from kata_vfio_ctl.kata3 import (
    GENERATED_NAME,
    KataRelease,
    derive,
    detect_release,
    install_kata,
    parse_version,
    release_from_keys,
    uninstall_kata,
)
from kata_vfio_ctl.kata_checks import doctor_checks
from kata_vfio_host.settings import Settings

# shaped like Kata 3.30's configuration-qemu.toml (excerpt; comments as shipped)
KATA3 = """\
# Copyright (c) 2017-2019 Intel Corporation
# XXX: WARNING: this file is auto-generated.

[hypervisor.qemu]
path = "/opt/kata/bin/qemu-system-x86_64"
kernel = "/opt/kata/share/kata-containers/vmlinux.container"
image = "/opt/kata/share/kata-containers/kata-containers.img"
machine_type = "q35"
enable_annotations = ["enable_iommu", "virtio_fs_extra_args", "kernel_params"]
kernel_params = ""
enable_iommu = false
# Enable hot-plugging of VFIO devices to a bridge-port,
# root-port or switch-port.
hot_plug_vfio = "no-port"
cold_plug_vfio = "no-port"
pcie_root_port = 0
# Recommended value when enabling: "/usr/share/oci/hooks"
guest_hook_path = ""

[agent.kata]
dial_timeout = 45

[runtime]
internetworking_model="tcfilter"
#  - guest-kernel
vfio_mode = "guest-kernel"
"""

# Kata 2.2-ish: no port keys, no vfio_mode
KATA2 = """\
[hypervisor.qemu]
path = "/usr/bin/qemu-system-x86_64"
kernel = "/usr/share/kata-containers/vmlinux.container"
image = "/usr/share/kata-containers/kata-containers.img"
machine_type = "q35"
#hotplug_vfio_on_root_bus = true
pcie_root_port = 0

[agent.kata]
dial_timeout = 45
"""

KATA1 = """\
[hypervisor.qemu]
path = "/usr/bin/qemu-system-x86_64"
machine_type = "pc"
use_vsock = false

[proxy.kata]
path = "/usr/libexec/kata-containers/kata-proxy"

[shim.kata]
path = "/usr/libexec/kata-containers/kata-shim"
"""

NO_PROGRAM: tuple[str, ...] = ()


def fake_runtime(tmp_path: Path, version: str) -> tuple[str, ...]:
    program = tmp_path / "bin" / "kata-runtime"
    program.parent.mkdir(exist_ok=True)
    program.write_text(
        f"#!/bin/sh\necho 'kata-runtime  : {version}'\n"
        "echo '   commit   : <<unknown>>'\necho '   OCI specs: 1.2.1'\n"
    )
    program.chmod(0o755)
    return (str(program),)


@pytest.fixture
def host(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(installed configuration, kata-vfio config.toml, state dir)."""
    kata = tmp_path / "etc/kata-containers/configuration.toml"
    kata.parent.mkdir(parents=True)
    kata.write_text(KATA3)
    config = tmp_path / "etc/kata-vfio/config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(
        '# kata-vfio\nruntime = "kata-runtime"\n\n[annotations]\n'
        '"io.katacontainers.config.hypervisor.enable_iommu" = "true"\n'
    )
    return kata, config, tmp_path / "state"


def qemu_of(text: str) -> dict[str, object]:
    return tomllib.loads(text)["hypervisor"]["qemu"]  # type: ignore[no-any-return]


# --- which Kata -----------------------------------------------------------------------------


def test_version_lines_of_both_majors() -> None:
    assert parse_version("kata-runtime  : 3.30.0\n   commit   : x\n", "p") == KataRelease(3, 30)
    assert parse_version("kata-runtime  : 1.13.0-alpha0\n", "p") == KataRelease(1, 13)
    assert parse_version("containerd-shim-kata-v2 something\n", "p") is None


@pytest.mark.parametrize(
    ("text", "release"),
    [
        (KATA3, (3, 2)),
        (KATA2, None),
        (KATA1, (1, 0)),
        (KATA2 + '\n[runtime]\nvfio_mode = "vfio"\n', (2, 3)),
    ],
)
def test_release_from_configuration_keys(text: str, release: tuple[int, int] | None) -> None:
    found = release_from_keys(tomllib.loads(text))
    assert (None if found is None else (found.major, found.minor)) == release


def test_program_wins_over_keys_and_disagreement_is_refused(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    data = tomllib.loads(KATA3)
    assert detect_release(conf, data, runtimes=fake_runtime(tmp_path, "3.30.0")) == KataRelease(
        3, 30
    )
    assert detect_release(conf, data, runtimes=NO_PROGRAM) == KataRelease(3, 2)
    with pytest.raises(ConfigError, match="--kata-version"):
        detect_release(conf, data, runtimes=fake_runtime(tmp_path, "1.13.0"))
    assert detect_release(conf, data, "1.13", runtimes=NO_PROGRAM).major == 1
    # a file that tells nothing: the program decides, and without one install asks
    trimmed = tomllib.loads(KATA2)
    assert detect_release(conf, trimmed, runtimes=fake_runtime(tmp_path, "2.2.3")) == KataRelease(
        2, 2
    )
    with pytest.raises(ConfigError, match="--kata-version"):
        detect_release(conf, trimmed, runtimes=NO_PROGRAM)


# --- the generated file ---------------------------------------------------------------------


def test_hook_mode_on_kata3(tmp_path: Path) -> None:
    text = derive(
        KATA3,
        tmp_path / "configuration.toml",
        KataRelease(3, 30),
        Settings(guest_hook_path="/usr/share/oci/hooks"),
    )
    qemu = qemu_of(text)
    assert (qemu["machine_type"], qemu["enable_iommu"]) == ("q35", True)
    assert (qemu["hot_plug_vfio"], qemu["cold_plug_vfio"], qemu["pcie_root_port"]) == (
        "root-port",
        "no-port",
        2,
    )
    assert qemu["guest_hook_path"] == "/usr/share/oci/hooks"
    assert qemu["image"] == "/opt/kata/share/kata-containers/kata-containers.img"
    assert "hotplug_vfio_on_root_bus" not in qemu
    assert tomllib.loads(text)["runtime"]["vfio_mode"] == "guest-kernel"
    # comments and everything else kept
    assert "# Enable hot-plugging of VFIO devices to a bridge-port," in text
    assert "#  - guest-kernel" in text and 'internetworking_model="tcfilter"' in text
    assert tomllib.loads(text)["agent"] == {"kata": {"dial_timeout": 45}}
    assert text.startswith("# kata-vfio: generated by")


def test_agent_mode_cold_plug_and_initrd(tmp_path: Path) -> None:
    cold = (
        KATA3.replace('cold_plug_vfio = "no-port"', 'cold_plug_vfio = "bridge-port"')
        .replace('guest_hook_path = ""', 'guest_hook_path = "/usr/share/oci/hooks"')
        .replace("pcie_root_port = 0", "pcie_root_port = 4")
    )
    text = derive(
        cold,
        tmp_path / "configuration.toml",
        KataRelease(3, 30),
        Settings(guest="agent"),
        initrd="/var/lib/kata-vfio/initrd.img",
    )
    qemu = qemu_of(text)
    # an admin who cold-plugs keeps cold-plugging, onto root ports; both may not be set
    assert (qemu["hot_plug_vfio"], qemu["cold_plug_vfio"], qemu["pcie_root_port"]) == (
        "no-port",
        "root-port",
        4,
    )
    assert qemu["guest_hook_path"] == ""
    assert qemu["initrd"] == "/var/lib/kata-vfio/initrd.img" and "image" not in qemu
    assert tomllib.loads(text)["runtime"]["vfio_mode"] == "vfio"


def test_older_kata2_gets_root_bus_hotplug(tmp_path: Path) -> None:
    text = derive(KATA2, tmp_path / "c.toml", KataRelease(2, 2, ""), Settings())
    qemu = qemu_of(text)
    assert (qemu["hotplug_vfio_on_root_bus"], qemu["pcie_root_port"]) == (True, 2)
    assert "hot_plug_vfio" not in qemu and "runtime" not in tomllib.loads(text)
    with pytest.raises(ConfigError, match=r"2\.3"):
        derive(KATA2, tmp_path / "c.toml", KataRelease(2, 2), Settings(guest="agent"))


def test_extra_hypervisor_annotations_are_enabled(tmp_path: Path) -> None:
    extra = {
        "io.katacontainers.config.hypervisor.enable_iommu": "true",
        "io.katacontainers.config.hypervisor.default_memory": "4096",
    }
    qemu = qemu_of(
        derive(KATA3, tmp_path / "c.toml", KataRelease(3, 30), Settings(annotations=extra))
    )
    assert qemu["enable_annotations"] == [
        "enable_iommu",
        "virtio_fs_extra_args",
        "kernel_params",
        "default_memory",
    ]


# --- install / uninstall --------------------------------------------------------------------


def test_install_uninstall_round_trip(host: tuple[Path, Path, Path], tmp_path: Path) -> None:
    kata, config, state = host
    kata_before, config_before = kata.read_bytes(), config.read_bytes()
    program = fake_runtime(tmp_path, "3.30.0")
    result = install_kata(kata, Settings(), config, state, runtimes=program)
    generated = kata.with_name(GENERATED_NAME)
    assert result.generated == generated and generated.is_file()
    assert result.release == KataRelease(3, 30)
    assert kata.read_bytes() == kata_before  # the installed file is never touched
    conf = tomllib.loads(config.read_text())
    assert conf["kata_config_path"] == str(generated)
    assert "# kata-vfio" in config.read_text()
    # again, now with the settings install left: nothing changes
    text = generated.read_text()
    settings = Settings(kata_config_path=str(generated))
    again = install_kata(kata, settings, config, state, runtimes=program)
    assert "up to date" in again.lines[0] and generated.read_text() == text
    lines = uninstall_kata(kata, settings, config, state)
    assert not generated.exists() and any("removed" in line for line in lines)
    assert kata.read_bytes() == kata_before
    assert config.read_bytes() == config_before


def test_uninstall_without_config_toml_removes_the_one_install_created(
    host: tuple[Path, Path, Path],
) -> None:
    kata, config, state = host
    config.unlink()
    install_kata(kata, Settings(), config, state, runtimes=NO_PROGRAM)
    assert tomllib.loads(config.read_text()) == {
        "kata_config_path": str(kata.with_name(GENERATED_NAME))
    }
    uninstall_kata(kata, Settings(), config, state)
    assert not config.exists() and not kata.with_name(GENERATED_NAME).exists()


def test_an_admins_file_is_never_overwritten_nor_removed(host: tuple[Path, Path, Path]) -> None:
    kata, config, state = host
    mine = kata.with_name(GENERATED_NAME)
    mine.write_text("# my own\n")
    with pytest.raises(ConfigError, match="not written by kata-vfio"):
        install_kata(kata, Settings(), config, state, runtimes=NO_PROGRAM)
    uninstall_kata(kata, Settings(kata_config_path=str(mine)), config, state)
    assert mine.read_text() == "# my own\n"


def test_kata1_keeps_the_in_place_edit(host: tuple[Path, Path, Path]) -> None:
    kata, config, state = host
    kata.write_text(KATA1)
    result = install_kata(kata, Settings(), config, state, runtimes=NO_PROGRAM)
    assert result.generated is None and result.release.major == 1
    assert qemu_of(kata.read_text())["guest_hook_path"] == "/usr/share/oci/hooks"
    assert not kata.with_name(GENERATED_NAME).exists()
    assert "kata_config_path" not in tomllib.loads(config.read_text())
    uninstall_kata(kata, Settings(), config, state)
    assert tomllib.loads(kata.read_text()) == tomllib.loads(KATA1)


# --- doctor ---------------------------------------------------------------------------------


def statuses(checks: list[object]) -> dict[str, str]:
    return {c.name: c.status for c in checks}  # type: ignore[attr-defined]


def test_doctor_before_and_after_install(host: tuple[Path, Path, Path], tmp_path: Path) -> None:
    kata, config, state = host
    before = doctor_checks(kata, Settings(), runtimes=NO_PROGRAM)
    assert before is not None and statuses(before)["kata:config_path"] == FAIL
    image = tmp_path / "image.img"
    image.write_bytes(b"\0" * 512)
    kata.write_text(
        KATA3.replace("/opt/kata/share/kata-containers/kata-containers.img", str(image))
    )
    install_kata(kata, Settings(guest="agent"), config, state, runtimes=NO_PROGRAM)
    settings = Settings(guest="agent", kata_config_path=str(kata.with_name(GENERATED_NAME)))
    after = doctor_checks(kata, settings, runtimes=NO_PROGRAM)
    assert after is not None
    assert statuses(after) == {
        "kata:version": OK,
        "kata:generated": OK,
        "kata:iommu": OK,
        "kata:plug": OK,
        "kata:vfio_mode": OK,
        "kata:guest_hook_path": OK,
        "kata:enable_annotations": OK,
        "kata:image": OK,
    }
    # hook mode with a disk image: kata-vfio cannot look inside it
    hook = doctor_checks(
        kata, Settings(kata_config_path=settings.kata_config_path), runtimes=NO_PROGRAM
    )
    assert hook is not None
    found = statuses(hook)
    assert (found["kata:vfio_mode"], found["kata:guest_hook_path"], found["kata:image"]) == (
        FAIL,
        FAIL,
        WARN,
    )
    # the installed file changed after install (a Kata upgrade): regenerate
    os.utime(kata, (os.path.getmtime(kata) + 10,) * 2)
    stale = doctor_checks(kata, settings, runtimes=NO_PROGRAM)
    assert stale is not None and statuses(stale)["kata:generated"] == WARN


def test_doctor_plug_settings_kata_refuses(host: tuple[Path, Path, Path]) -> None:
    kata, config, state = host
    generated = kata.with_name(GENERATED_NAME)
    install_kata(kata, Settings(), config, state, runtimes=NO_PROGRAM)
    generated.write_text(generated.read_text().replace('"root-port"', '"no-port"'))
    checks = doctor_checks(kata, Settings(kata_config_path=str(generated)), runtimes=NO_PROGRAM)
    assert checks is not None and statuses(checks)["kata:plug"] == FAIL


def test_doctor_leaves_kata1_to_its_own_checks(host: tuple[Path, Path, Path]) -> None:
    kata, _, _ = host
    kata.write_text(KATA1)
    assert doctor_checks(kata, Settings(), runtimes=NO_PROGRAM) is None


def test_doctor_looks_for_the_hook_in_the_initrd(
    host: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kata, config, state = host
    lsinitrd = tmp_path / "bin" / "lsinitrd"
    lsinitrd.parent.mkdir(exist_ok=True)
    listing = tmp_path / "listing"
    lsinitrd.write_text(f"#!/bin/sh\ncat {listing}\n")
    lsinitrd.chmod(0o755)
    initrd = tmp_path / "kata-vfio-initrd.img"
    initrd.write_bytes(b"070701")
    with pytest.raises(ConfigError, match="does not exist"):
        install_kata(
            kata, Settings(), config, state, initrd=str(tmp_path / "none.img"), runtimes=NO_PROGRAM
        )
    install_kata(kata, Settings(), config, state, initrd=str(initrd), runtimes=NO_PROGRAM)
    settings = Settings(kata_config_path=str(kata.with_name(GENERATED_NAME)))
    monkeypatch.setenv("PATH", f"{lsinitrd.parent}:{os.environ['PATH']}")
    for text, status in [
        (
            "-rwxr-xr-x 1 root root 273 Nov 24 08:03 usr/share/oci/hooks/prestart/kata-vfio-hook\n",
            OK,
        ),
        (
            "-rw-r--r-- 1 root root 273 Nov 24 08:03 usr/share/oci/hooks/prestart/kata-vfio-hook\n",
            FAIL,
        ),
        ("drwxr-xr-x 2 root root 0 Nov 24 08:03 usr/share/oci/hooks\n", FAIL),
    ]:
        listing.write_text(text)
        checks = doctor_checks(kata, settings, runtimes=NO_PROGRAM)
        assert checks is not None and statuses(checks)["kata:image"] == status, text


def test_uninstall_after_the_state_dir_was_lost(
    host: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    kata, config, state = host
    install_kata(kata, Settings(), config, state, runtimes=NO_PROGRAM)
    generated = kata.with_name(GENERATED_NAME)
    uninstall_kata(
        kata, Settings(kata_config_path=str(generated)), config, tmp_path / "another-state"
    )
    assert not generated.exists()
    assert "kata_config_path" not in tomllib.loads(config.read_text())


def test_kata1_with_kata_config_path_is_refused(host: tuple[Path, Path, Path]) -> None:
    kata, config, state = host
    kata.write_text(KATA1)
    settings = Settings(kata_config_path=str(kata.with_name(GENERATED_NAME)))
    with pytest.raises(ConfigError, match="kata_config_path"):
        install_kata(kata, settings, config, state, runtimes=NO_PROGRAM)
    checks = doctor_checks(kata, settings, runtimes=NO_PROGRAM)
    assert checks is not None and statuses(checks)["kata:config_path"] == FAIL
    assert kata.read_text() == KATA1


def test_doctor_on_a_file_that_tells_no_release(host: tuple[Path, Path, Path]) -> None:
    """Then the wrapper's own rule decides: no kata_config_path, Kata 1.x checks."""
    kata, config, state = host
    kata.write_text(KATA2)
    assert doctor_checks(kata, Settings(), runtimes=NO_PROGRAM) is None
    install_kata(kata, Settings(), config, state, kata_version="2.2", runtimes=NO_PROGRAM)
    settings = Settings(kata_config_path=str(kata.with_name(GENERATED_NAME)))
    checks = doctor_checks(kata, settings, runtimes=NO_PROGRAM)
    assert checks is not None
    found = statuses(checks)
    assert (found["kata:version"], found["kata:generated"], found["kata:plug"]) == (WARN, OK, OK)
