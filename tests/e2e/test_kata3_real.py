"""The generated Kata >= 2 configuration against the user's installed Kata >= 2.

`kata-runtime --config FILE kata-env --json` (Kata's own CLI and configuration loader) must
accept the file that `install_kata` derives from the installed configuration-qemu.toml and
report q35, the plug mode and the hook path. The installed Kata is named by
KATA_VFIO_KATA3_RUNTIME (and KATA_VFIO_KATA3_CONFIG; tests/kata/installed.py): Kata is in no
registry this project can use, so `make test` checks the same files against Kata's documented
rules instead (tests/ctl/test_kata3_rules.py) and this runs under `make test-kata`.

Test-only: the installed configuration is copied to a scratch directory (the installation is
never touched); where its kernel or image does not exist, the copy names Debian's
/boot/vmlinuz-* and a dummy image (kata-env checks that both exist). kata-runtime runs
through tests/kata3/kata_env.py: a private mount namespace where /dev is an overlay with a
stand-in /dev/vhost-vsock (a host without one; Kata only stats it) and a /dev/log socket, as
nobody (as root kata-env would search every vsock CID on the stand-in).

Skipped when no Kata >= 2 is given, unless KATA_VFIO_REQUIRE_KATA=1 (then it fails).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kata_vfio_ctl.kata3 import GENERATED_NAME, KataRelease, install_kata, uninstall_kata
from kata_vfio_host.settings import Settings

from kata import installed

pytestmark = pytest.mark.kata3

HERE = Path(__file__).resolve().parents[1]  # tests/
KATA_ENV = HERE / "kata3" / "kata_env.py"
QEMU = Path("/usr/bin/qemu-system-x86_64")
HOOKS = "/usr/share/oci/hooks"


def unavailable(reason: str) -> None:
    if os.environ.get("KATA_VFIO_REQUIRE_KATA") == "1":
        pytest.fail(f"{reason} (KATA_VFIO_REQUIRE_KATA=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def kata3() -> dict[str, Path]:
    try:
        given = installed.kata3()
    except installed.Unavailable as exc:
        unavailable(str(exc))
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        unavailable("needs root and unshare (a private mount namespace for kata-runtime)")
    return given


@pytest.fixture
def scratch() -> Iterator[Path]:
    """World-readable: kata-runtime runs as nobody (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="kata-vfio-kata3-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def installed_config(kata3: dict[str, Path], scratch: Path) -> Path:
    """A copy of the installed configuration-qemu.toml, its kernel and image existing."""
    import tomlkit

    doc = tomlkit.parse(kata3["configuration-qemu.toml"].read_text())
    qemu = doc["hypervisor"]["qemu"]
    if not Path(str(qemu.get("kernel", ""))).is_file():
        kernels = sorted(Path("/boot").glob("vmlinuz-*"))
        if not kernels:
            unavailable("no /boot/vmlinuz-* (Debian linux-image-amd64)")
        qemu["kernel"] = str(kernels[-1])
    if not Path(str(qemu.get("image", qemu.get("initrd", "")))).is_file():
        image = scratch / "kata-containers.img"
        image.write_bytes(b"\0" * 4096)
        qemu["image"] = str(image)
    etc = scratch / "etc/kata-containers"
    etc.mkdir(parents=True)
    etc.chmod(0o755)
    path = etc / "configuration.toml"
    path.write_text(tomlkit.dumps(doc))
    path.chmod(0o644)
    return path


def in_kata_namespace(scratch: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    workdir = Path(tempfile.mkdtemp(prefix="dev-", dir=scratch))
    return subprocess.run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            sys.executable,
            str(KATA_ENV),
            str(workdir),
            "--",
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def kata_env(kata3: dict[str, Path], scratch: Path, config: Path) -> dict[str, Any]:
    done = in_kata_namespace(
        scratch, str(kata3["kata-runtime"]), "--config", str(config), "kata-env", "--json"
    )
    assert done.returncode == 0, f"kata-env refused {config}: {done.stderr.strip()}"
    return json.loads(done.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize("guest", ["hook", "agent"])
def test_installed_kata_accepts_the_generated_configuration(
    kata3: dict[str, Path], scratch: Path, guest: str
) -> None:
    copy = installed_config(kata3, scratch)
    config_toml = scratch / "etc/kata-vfio/config.toml"
    state = scratch / "state"
    copy_bytes = copy.read_bytes()
    release = KataRelease(*installed.runtime_version(kata3["kata-runtime"]))
    settings = Settings(guest=guest)

    result = install_kata(
        copy, settings, config_toml, state, runtimes=(str(kata3["kata-runtime"]),)
    )
    generated = copy.with_name(GENERATED_NAME)
    assert result.release == release  # from the real `kata-runtime --version`
    assert result.generated == generated
    assert tomllib.loads(config_toml.read_text())["kata_config_path"] == str(generated)

    env = kata_env(kata3, scratch, generated)
    hypervisor = env["Hypervisor"]
    print(f"kata-env ({guest}): {json.dumps(hypervisor)}", file=sys.stderr)
    assert env["Runtime"]["Config"]["Path"] == str(generated)
    assert hypervisor["MachineType"] == "q35"
    if release.has_port_plugging:
        assert (hypervisor["HotPlugVFIO"], hypervisor["ColdPlugVFIO"]) == ("root-port", "no-port")
        assert hypervisor["PCIeRootPort"] >= 1
    else:
        assert hypervisor["HotplugVFIOOnRootBus"] is True
    assert hypervisor["SecurityInfo"]["GuestHookPath"] == (HOOKS if guest == "hook" else "")

    lines = uninstall_kata(copy, settings, config_toml, state)
    assert not generated.exists(), lines
    assert copy.read_bytes() == copy_bytes
    assert not config_toml.exists()  # install created it; nothing else was in it
