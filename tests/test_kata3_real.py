"""The generated Kata >= 2 configuration against a real Kata 3.30 built from source.

`kata-runtime --config FILE kata-env --json` (Kata's CLI) must accept the file that
`install_kata` derives from Kata's own generated configuration-qemu.toml and report q35, the
plug mode and the hook path; `kata-vfio-confcheck` (tests/kata3/confcheck.go: the shim's own
steps, katautils.LoadConfiguration + oci.SandboxConfig) reads a bundle the wrapper edited,
follows its io.katacontainers.config_path annotation and reports what kata-env does not show
(enable_iommu, vfio_mode). Built by tests/kata3/build.py, cached by tarball hash.

Test-only changes to Kata's configuration-qemu.toml (nothing else is touched): `kernel` points
at Debian's /boot/vmlinuz-*, `image` at a dummy file (kata-env checks that both exist).
kata-runtime runs through tests/kata3/kata_env.py: a private mount namespace where /dev is an
overlay with a stand-in /dev/vhost-vsock (this host has none; Kata only stats it) and a
/dev/log socket, as nobody (as root kata-env would search every vsock CID on the stand-in).

Skipped when the source tarball is missing, unless KATA_VFIO_REQUIRE_KATA=1 (then it fails).
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

from kata3 import build as kata3_build
from kata_vfio.manifest import DEVICES_ANNOTATION
from kata_vfio_ctl.kata3 import GENERATED_NAME, KataRelease, install_kata, uninstall_kata
from kata_vfio_host.settings import Settings
from kata_vfio_runtime.spec_edit import edit_bundle

from fakesys import FakeSysfs

pytestmark = pytest.mark.kata3

HERE = Path(__file__).parent
KATA_ENV = HERE / "kata3" / "kata_env.py"
QEMU = Path("/usr/bin/qemu-system-x86_64")
HOOKS = "/usr/share/oci/hooks"


def unavailable(reason: str) -> None:
    if os.environ.get("KATA_VFIO_REQUIRE_KATA") == "1":
        pytest.fail(f"{reason} (KATA_VFIO_REQUIRE_KATA=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def kata3() -> dict[str, Path]:
    tarball = kata3_build.default_tarball()
    if not tarball.is_file():
        unavailable(f"no Kata 3.x source tarball at {tarball}")
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        unavailable("needs root and unshare (a private mount namespace for kata-runtime)")
    if not QEMU.is_file():
        unavailable(f"no {QEMU} (Debian qemu-system-x86)")
    info = kata3_build.build(tarball)
    print(f"kata3 build: {json.dumps(info)}", file=sys.stderr)
    return {k: Path(v) for k, v in info["outputs"].items()}  # type: ignore[attr-defined]


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
    """Kata's own generated configuration-qemu.toml, with real kernel and image paths."""
    import tomlkit

    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    if not kernels:
        unavailable("no /boot/vmlinuz-* (Debian linux-image-amd64)")
    image = scratch / "kata-containers.img"
    image.write_bytes(b"\0" * 4096)
    doc = tomlkit.parse(kata3["configuration-qemu.toml"].read_text())
    qemu = doc["hypervisor"]["qemu"]
    qemu["kernel"] = str(kernels[-1])
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
    return subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable,
                           str(KATA_ENV), str(workdir), "--", *argv],
                          capture_output=True, text=True, timeout=120, check=False)


def kata_env(kata3: dict[str, Path], scratch: Path, config: Path) -> dict[str, Any]:
    done = in_kata_namespace(scratch, str(kata3["kata-runtime"]), "--config", str(config),
                             "kata-env", "--json")
    assert done.returncode == 0, f"kata-env refused {config}: {done.stderr.strip()}"
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def confcheck(kata3: dict[str, Path], scratch: Path, bundle: Path, *config: Path
              ) -> subprocess.CompletedProcess[str]:
    return in_kata_namespace(scratch, str(kata3["kata-vfio-confcheck"]), str(bundle),
                             *map(str, config))


def wrapper_bundle(scratch: Path, host: FakeSysfs, settings: Settings, name: str) -> Path:
    """An OCI bundle asking for a VFIO device, edited by the wrapper's own create-time edit."""
    bundle = scratch / name
    (bundle / "rootfs").mkdir(parents=True)
    bundle.chmod(0o755)
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["annotations"] = {DEVICES_ANNOTATION: "0000:03:00.0"}
    (bundle / "config.json").write_text(json.dumps(spec))
    assert edit_bundle(bundle, settings).written
    (bundle / "config.json").chmod(0o644)
    return bundle


@pytest.mark.parametrize("guest", ["hook", "agent"])
def test_kata_330_accepts_the_generated_configuration(
        kata3: dict[str, Path], scratch: Path, vfio_host: FakeSysfs, guest: str) -> None:
    installed = installed_config(kata3, scratch)
    config_toml = scratch / "etc/kata-vfio/config.toml"
    state = scratch / "state"
    installed_bytes = installed.read_bytes()

    result = install_kata(installed, Settings(guest=guest), config_toml, state,
                          runtimes=(str(kata3["kata-runtime"]),))
    generated = installed.with_name(GENERATED_NAME)
    assert result.release == KataRelease(3, 30)  # from the real `kata-runtime --version`
    assert result.generated == generated
    assert tomllib.loads(config_toml.read_text())["kata_config_path"] == str(generated)

    env = kata_env(kata3, scratch, generated)
    hypervisor = env["Hypervisor"]
    assert env["Runtime"]["Config"]["Path"] == str(generated)
    assert hypervisor["MachineType"] == "q35"
    assert (hypervisor["HotPlugVFIO"], hypervisor["ColdPlugVFIO"], hypervisor["PCIeRootPort"]) \
        == ("root-port", "no-port", 2)
    assert hypervisor["SecurityInfo"]["GuestHookPath"] == (HOOKS if guest == "hook" else "")
    assert env["Image"]["Path"] == str(scratch / "kata-containers.img")
    print(f"kata-env ({guest}): {json.dumps(hypervisor)}", file=sys.stderr)

    # the wrapper's annotations, read the way Kata 3.x's shim reads them
    settings = Settings(sysfs=str(vfio_host.root), guest=guest, kata_config_path=str(generated))
    bundle = wrapper_bundle(scratch, vfio_host, settings, "bundle")
    done = confcheck(kata3, scratch, bundle)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    print(f"confcheck ({guest}): {done.stdout.strip()}", file=sys.stderr)
    assert seen["ConfigPath"] == str(generated)
    assert (seen["MachineType"], seen["EnableIOMMU"], seen["HotPlugVFIO"]) == \
        ("q35", True, "root-port")
    want_mode = "vfio" if guest == "agent" else "guest-kernel"
    assert (seen["ConfigVfioMode"], seen["SandboxVfioMode"]) == (want_mode, want_mode)
    assert seen["GuestHookPath"] == (HOOKS if guest == "hook" else "")

    lines = uninstall_kata(installed, settings, config_toml, state)
    assert not generated.exists(), lines
    assert installed.read_bytes() == installed_bytes
    assert not config_toml.exists()  # install created it; nothing else was in it


def test_kata_330_refuses_the_kata1_annotation(kata3: dict[str, Path], scratch: Path,
                                               vfio_host: FakeSysfs) -> None:
    """Why the generated file exists: the guest_hook_path annotation the wrapper adds for
    Kata 1.x is refused by Kata 3.30's stock configuration."""
    installed = installed_config(kata3, scratch)
    bundle = wrapper_bundle(scratch, vfio_host, Settings(sysfs=str(vfio_host.root)), "kata1")
    done = confcheck(kata3, scratch, bundle, installed)
    assert done.returncode == 1
    assert "guest_hook_path" in done.stderr and "not enabled" in done.stderr, done.stderr
