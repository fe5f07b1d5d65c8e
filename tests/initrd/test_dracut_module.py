"""The dracut module without build.py: generated into its own directory, used by the
system's dracut exactly as the README says (in a scratch copy of /usr/lib/dracut)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dracut_module import MODULE_NAME, install_module

from wrapper_run import REPO, SOURCE_PATH

HOOK = "usr/share/oci/hooks/prestart/kata-vfio-hook"
SYSTEM_DRACUT = Path("/usr/lib/dracut")


def kernel_version() -> str | None:
    wanted = os.environ.get("KATA_VFIO_KVER")
    if wanted:
        return wanted
    found = sorted(p.name for p in Path("/lib/modules").glob("*") if (p / "modules.dep").exists())
    return found[-1] if found else None


def module_check(moddir: Path) -> subprocess.CompletedProcess[str]:
    """dracut's call of the module's check(), as when it is asked for (hostonly unset)."""
    script = 'derror() { echo "$*" >&2; }; . "$1/module-setup.sh"; moddir="$1" check'
    return subprocess.run(
        ["bash", "-c", script, "bash", str(moddir)], capture_output=True, text=True, timeout=30
    )


def test_the_module_needs_no_environment_once_generated(tmp_path: Path) -> None:
    moddir = install_module(tmp_path / "modules.d")
    assert moddir == tmp_path / "modules.d" / MODULE_NAME
    assert module_check(moddir).returncode == 255  # include when asked for
    launcher = moddir / "kata-vfio-hook"
    assert os.access(launcher, os.X_OK) and not launcher.is_symlink()
    pairs = [line.split("\t") for line in (moddir / "files.tsv").read_text().splitlines()]
    ours = [(s, d) for s, d in pairs if not s.startswith("/")]
    assert ("pylib/kata_vfio_hook/main.py", "/usr/lib/kata-vfio/kata_vfio_hook/main.py") in ours
    assert all((moddir / s).is_file() for s, _ in ours)
    assert ("/usr/lib/python3.11/subprocess.py", "/usr/lib/python3.11/subprocess.py") in [
        (s, d) for s, d in pairs
    ]  # the standard library the hook imports, from the host
    assert not list(moddir.rglob("__pycache__"))
    # installing again replaces the module whole
    (moddir / "stray").write_text("")
    assert not (install_module(tmp_path / "modules.d") / "stray").exists()


def test_an_ungenerated_module_says_how_to_generate_it(tmp_path: Path) -> None:
    moddir = tmp_path / MODULE_NAME
    moddir.mkdir()
    shutil.copy(REPO / "initrd" / MODULE_NAME / "module-setup.sh", moddir)
    result = module_check(moddir)
    assert result.returncode == 1 and "make install-dracut-module" in result.stderr


def test_build_failure_is_one_line_with_dracuts_words(tmp_path: Path) -> None:
    kver = kernel_version()
    if kver is None or not Path(f"/lib/modules/{kver}").is_dir():
        pytest.skip("no kernel modules installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    dracut = bin_dir / "dracut"
    dracut.write_text("#!/bin/sh\necho 'dracut: Cannot find module directory' >&2\nexit 1\n")
    dracut.chmod(0o755)
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "initrd/build.py"),
            "--kver",
            kver,
            "--output",
            str(tmp_path / "out.img"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": SOURCE_PATH},
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("build.py: "), result.stderr
    assert "dracut exited with 1: dracut: Cannot find module directory" in lines[0]


@pytest.mark.dracut
def test_the_readme_route_with_the_system_dracut(tmp_path: Path) -> None:
    kver = kernel_version()
    if kver is None or shutil.which("dracut") is None or shutil.which("lsinitrd") is None:
        pytest.skip("needs dracut, lsinitrd and an installed kernel's modules")
    # a scratch copy of /usr/lib/dracut: the real one is never touched
    base = tmp_path / "dracut"
    shutil.copytree(SYSTEM_DRACUT, base, symlinks=True)
    # README: make install-dracut-module DRACUT_MODULES_DIR=…
    subprocess.run(
        [
            "make",
            "-C",
            str(REPO),
            "--no-print-directory",
            "install-dracut-module",
            f"DRACUT_MODULES_DIR={base / 'modules.d'}",
        ],
        check=True,
        timeout=300,
    )
    # README: add_dracutmodules+=" kata-vfio " in a dracut.conf.d file
    confdir = tmp_path / "dracut.conf.d"
    confdir.mkdir()
    (confdir / "50-kata-vfio.conf").write_text('add_dracutmodules+=" kata-vfio "\n')
    # only to keep the test quick: a minimal, non-host-only image around it
    (confdir / "00-minimal.conf").write_text('dracutmodules+=" base "\nhostonly="no"\n')
    image = tmp_path / "initrd.img"
    (tmp_path / "tmp").mkdir()
    subprocess.run(
        [
            "dracut",
            "--force",
            "--quiet",
            "--conf",
            "/dev/null",
            "--confdir",
            str(confdir),
            "--tmpdir",
            str(tmp_path / "tmp"),
            "--kver",
            kver,
            str(image),
        ],
        check=True,
        timeout=600,
        env={**os.environ, "dracutbasedir": str(base)},
    )
    listing = subprocess.run(
        ["lsinitrd", str(image)], capture_output=True, text=True, check=True
    ).stdout
    entries = {
        line.split()[-1]: line
        for line in listing.splitlines()
        if line[:1] in "-dl" and len(line.split()) >= 9
    }
    assert entries[HOOK].startswith("-rwxr-xr-x"), entries.get(HOOK)  # a real, executable file
    assert entries["usr/bin/python3"].startswith("-rwx")
    assert "usr/lib/kata-vfio/kata_vfio_hook/main.py" in entries
    # issue 8: bytecode for what the hook imports, so its first run compiles nothing
    for pyc in (
        "usr/lib/kata-vfio/kata_vfio_hook/__pycache__/main.cpython-311.pyc",
        "usr/lib/python3.11/__pycache__/json.cpython-311.pyc"
        if "usr/lib/python3.11/json.py" in entries
        else "usr/lib/python3.11/json/__pycache__/__init__.cpython-311.pyc",
    ):
        assert pyc in entries, pyc
    header = subprocess.run(
        [
            "lsinitrd",
            "-f",
            "usr/lib/kata-vfio/kata_vfio_hook/__pycache__/main.cpython-311.pyc",
            str(image),
        ],
        capture_output=True,
        check=True,
    ).stdout[:16]
    assert int.from_bytes(header[4:8], "little") == 1  # unchecked hash: never recompiled
    modules = {Path(name).name.split(".")[0] for name in entries if ".ko" in name}
    assert {"vfio", "vfio-pci", "vfio_iommu_type1"} <= modules, modules
    hook = subprocess.run(
        ["lsinitrd", "-f", HOOK, str(image)], capture_output=True, text=True, check=True
    ).stdout
    assert hook.startswith("#!/usr/bin/python3 -IS") and "kata_vfio_hook.main" in hook
    # doctor finds the hook in the listing of this very image
    from kata_vfio_ctl.checks import OK
    from kata_vfio_ctl.kata_checks import check_kata_initrd

    conf = tmp_path / "configuration.toml"
    conf.write_text(f'[hypervisor.qemu]\ninitrd = "{image}"\n')
    assert check_kata_initrd(conf).status == OK
