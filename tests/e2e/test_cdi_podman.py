"""The CDI spec read by the real podman 4.3 here, with kata-vfio as the runtime.

podman 4.3 reads CDI specs only from /etc/cdi and /var/run/cdi: its containers.conf has
no `cdi_spec_dirs` (containers/common added the key later, and podman honours a spec
directory only from 5.x on, with `--cdi-spec-dir`). So that the test leaves the host's
/etc alone, each podman runs in a private mount namespace where /etc is an overlay with
/etc/cdi bound to the test's spec directory.

The host's PCI view is a fake sysfs (no IOMMU here). No host /dev/vfio/<N> node is
needed: the spec gives type, major and minor, and runc creates the node in the container.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kata_vfio_ctl.cdi import build_spec, survey_groups, write_spec
from kata_vfio_ctl.podman_conf import register

from fakesys import FakeSysfs, engine_host
from wrapper_run import busybox_rootfs, installed

pytestmark = [
    pytest.mark.podman,
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("podman") or not shutil.which("unshare"),
        reason="needs root, podman, unshare",
    ),
]
IMAGE = "localhost/kata-vfio-cdi-busybox"

# Runs podman with /etc/cdi = $CDI_DIR, in the mount namespace `unshare` gave it.
PODMAN_IN_NAMESPACE = """\
#!/bin/sh
set -e
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$TOP/etc-upper,workdir=$TOP/etc-work" /etc
mkdir -p /etc/cdi
mount --bind "$CDI_DIR" /etc/cdi
exec podman "$@"
"""


@dataclass
class Podman:
    base: list[str]
    env: dict[str, str]
    sysfs: FakeSysfs
    log_file: Path
    top: Path
    host_etc_cdi: list[str] | None  # what the host's /etc/cdi held before the tests

    def run(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*self.base, *args], env=self.env, text=True, capture_output=True, timeout=120
        )
        if check:
            assert result.returncode == 0, result.stderr
        return result


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    top = tmp_path_factory.mktemp("cdi-podman")
    host_etc_cdi = listing(Path("/etc/cdi"))
    fs = engine_host(top / "sys")
    fs.add_device("0000:05:00.0", group=14, driver="nvme")  # not usable: not in the spec
    log_file = top / "kata-vfio.log"
    config = top / "kata-vfio.toml"
    config.write_text(
        f'runtime = "runc"\nsysfs = "{fs.root}"\nlog_file = "{log_file}"\n'
        f'state_dir = "{top / "state"}"\n'
        # runc stands in for Kata: without CAP_SYS_RESOURCE here it cannot
        # raise RLIMIT_MEMLOCK (Kata applies it inside the guest)
        "raise_memlock = false\n"
    )
    launcher = top / "bin" / "kata-vfio"
    launcher.parent.mkdir()
    wrapper = installed("kata-vfio")
    launcher.write_text(f'#!/bin/sh\nKATA_VFIO_CONFIG={config} exec {wrapper} "$@"\n')
    launcher.chmod(0o755)
    conf = top / "containers.conf"
    conf.write_text(
        '[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
        '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
    )
    register(conf, str(launcher))
    for d in ("etc-upper", "etc-work", "cdi"):
        (top / d).mkdir()
    script = top / "podman-cdi"
    script.write_text(PODMAN_IN_NAMESPACE)
    script.chmod(0o755)
    env = {**os.environ, "CONTAINERS_CONF": str(conf), "TOP": str(top), "CDI_DIR": str(top / "cdi")}
    base = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        str(script),
        "--root",
        str(top / "storage"),
        "--runroot",
        str(top / "run"),
        "--storage-driver",
        "vfs",
        "--runtime",
        "kata-vfio",
    ]
    rootfs = busybox_rootfs(top / "rootfs", ("sh", "stat", "ls", "cat"))
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(top / "rootfs.tar"), "."], check=True)
    pm = Podman(base, env, fs, log_file, top, host_etc_cdi)
    pm.run("import", str(top / "rootfs.tar"), IMAGE, check=True)
    usable, _ = survey_groups(fs.root)
    write_spec(top / "cdi/kata-vfio.json", build_spec(usable))
    yield pm
    pm.run("rm", "--all", "--force")


def listing(path: Path) -> list[str] | None:
    return sorted(os.listdir(path)) if path.is_dir() else None


def wrapper_events(pm: Podman, cidfile: Path) -> list[dict[str, object]]:
    cid = cidfile.read_text().strip()
    events = [json.loads(line) for line in pm.log_file.read_text().splitlines()]
    return [e for e in events if e.get("container_id") == cid]


@pytest.mark.parametrize(
    ("address", "group", "numbers"),
    [("0000:03:00.0", "12", "f3:0"), ("0000:04:00.1", "13", "f3:1")],
)
def test_device_by_address_gives_the_group_node(
    podman: Podman, tmp_path: Path, address: str, group: str, numbers: str
) -> None:
    cidfile = tmp_path / "cid"
    result = podman.run(
        "run",
        "--rm",
        "--cidfile",
        str(cidfile),
        "--network",
        "none",
        "--device",
        f"kata-vfio.io/pci={address}",
        IMAGE,
        "stat",
        "-c",
        "%F %t:%T %n",
        "/dev/vfio/vfio",
        f"/dev/vfio/{group}",
        check=True,
    )
    # major:minor in hex, as stat prints them: 10:196 = a:c4, 243:N = f3:N
    assert result.stdout.splitlines() == [
        "character special file a:c4 /dev/vfio/vfio",
        f"character special file {numbers} /dev/vfio/{group}",
    ]
    # the wrapper resolved the group from the node CDI added, with all its members
    events = wrapper_events(podman, cidfile)
    assert events and events[0]["event"] == "spec edited"
    assert events[0]["groups"] == [group]
    assert str(events[0]["devices"]).count("0000:") == (2 if group == "13" else 1)


def test_two_cdi_devices_in_one_container(podman: Podman) -> None:
    result = podman.run(
        "run",
        "--rm",
        "--network",
        "none",
        "--device",
        "kata-vfio.io/pci=0000:03:00.0",
        "--device",
        "kata-vfio.io/pci=0000:04:00.0",
        IMAGE,
        "ls",
        "/dev/vfio",
        check=True,
    )
    assert result.stdout.split() == ["12", "13", "vfio"]


def test_a_device_not_in_the_spec_is_refused_by_podman(podman: Podman) -> None:
    result = podman.run(
        "run",
        "--rm",
        "--network",
        "none",
        "--device",
        "kata-vfio.io/pci=0000:05:00.0",
        IMAGE,
        "true",
    )
    assert result.returncode != 0
    assert "unresolvable CDI devices kata-vfio.io/pci=0000:05:00.0" in result.stderr


def test_the_hosts_etc_was_not_touched(podman: Podman) -> None:
    assert listing(Path("/etc/cdi")) == podman.host_etc_cdi
    assert (podman.top / "etc-upper/cdi").is_dir()  # where the namespace's mkdir went
