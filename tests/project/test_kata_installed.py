"""`make test-kata`'s look-up of the user's installed Kata (tests/kata/installed.py): the paths
it takes, and the one line it prints for what is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kata import installed

INSTALLED = Path(installed.__file__)


def program(path: Path, version: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho 'kata-runtime  : {version}'\necho '   commit   : x'\n")
    path.chmod(0o755)
    return path


def kata1_install(tmp_path: Path) -> dict[str, str]:
    """A Kata 1.x laid out as its packages install it: the environment naming it."""
    libexec = tmp_path / "usr/libexec/kata-containers"
    for name in ("kata-shim", "kata-proxy", "kata-netmon"):
        program(libexec / name, "1.13.0")
    config = tmp_path / "usr/share/defaults/kata-containers/configuration.toml"
    config.parent.mkdir(parents=True)
    config.write_text(
        f'[hypervisor.qemu]\npath = "/usr/bin/qemu-system-x86_64"\n'
        f'[proxy.kata]\npath = "{libexec}/kata-proxy"\n'
        f'[shim.kata]\npath = "{libexec}/kata-shim"\n'
        f'[netmon]\npath = "{libexec}/kata-netmon"\n'
    )
    return {
        "KATA_VFIO_KATA_RUNTIME": str(program(tmp_path / "usr/bin/kata-runtime", "1.13.0")),
        "KATA_VFIO_KATA_CONFIG": str(config),
        "KATA_VFIO_KATA_AGENT": str(program(tmp_path / "agent/kata-agent", "1.13.0")),
    }


def check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(INSTALLED)],
        capture_output=True,
        text=True,
        env={"PATH": "/nonexistent", **env},
        check=False,
    )


def test_a_kata1_installation_is_taken_from_its_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = kata1_install(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    bins = installed.kata1()
    libexec = tmp_path / "usr/libexec/kata-containers"
    assert bins["kata-shim"] == libexec / "kata-shim"
    assert bins["kata-proxy"] == libexec / "kata-proxy"
    assert bins["kata-netmon"] == libexec / "kata-netmon"
    assert bins["kata-agent"] == Path(env["KATA_VFIO_KATA_AGENT"])
    done = check(env)
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "kata", "")


@pytest.mark.parametrize(
    ("change", "line"),
    [
        (
            {"KATA_VFIO_KATA_AGENT": ""},
            "no Kata 1.x kata-agent for the guest image: set KATA_VFIO_KATA_AGENT=PATH",
        ),
        (
            {"KATA_VFIO_KATA_AGENT": "/nonexistent/kata-agent"},
            "KATA_VFIO_KATA_AGENT=/nonexistent/kata-agent: no such file",
        ),
        (
            {"KATA_VFIO_KATA_RUNTIME": ""},
            "no Kata 1.x kata-runtime: set KATA_VFIO_KATA_RUNTIME=PATH",
        ),
    ],
)
def test_what_is_missing_is_one_line(tmp_path: Path, change: dict[str, str], line: str) -> None:
    env = {**kata1_install(tmp_path), **change}
    done = check({k: v for k, v in env.items() if v})
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"make test-kata: {line}")


def test_a_kata3_runtime_where_kata1_is_wanted_is_named(tmp_path: Path) -> None:
    env = {
        **kata1_install(tmp_path),
        "KATA_VFIO_KATA_RUNTIME": str(program(tmp_path / "kata3/kata-runtime", "3.30.0")),
    }
    done = check(env)
    assert done.returncode == 1
    assert "is Kata 3.30: these tests need Kata 1.x's OCI command line" in done.stderr


def test_a_kata3_alone_selects_the_kata3_tests(tmp_path: Path) -> None:
    config = tmp_path / "configuration-qemu.toml"
    config.write_text('[hypervisor.qemu]\nmachine_type = "q35"\n')
    done = check(
        {
            "KATA_VFIO_KATA3_RUNTIME": str(program(tmp_path / "kata-runtime", "3.30.0")),
            "KATA_VFIO_KATA3_CONFIG": str(config),
        }
    )
    assert (done.returncode, done.stdout.strip()) == (0, "kata3"), done.stderr


def test_nothing_given_says_so(tmp_path: Path) -> None:
    done = check({})
    assert done.returncode == 1
    assert (
        done.stderr == "make test-kata: no Kata 1.x kata-runtime: set "
        "KATA_VFIO_KATA_RUNTIME=PATH (see README, 'Against your Kata')\n"
    )
