"""Real podman + runc on this machine, with kata-vfio registered as the runtime.

The host view of PCI comes from a fake sysfs tree (this machine has no IOMMU);
everything else is real: podman 4.x, conmon, runc, the OCI bundle, the device
nodes runc creates in the container.
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

from kata_vfio.manifest import GUEST_HOOK_PATH_ANNOTATION, MANIFEST_ANNOTATION, Manifest
from kata_vfio_ctl.podman_conf import register

from fakesys import FakeSysfs, engine_host
from ocischema import schema_errors
from wrapper_run import busybox_rootfs, installed

pytestmark = [
    pytest.mark.podman,
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("podman"), reason="needs root and podman"
    ),
]
IMAGE = "localhost/kata-vfio-test-busybox"
DEVICES = "io.kata-vfio.devices"


@dataclass
class Podman:
    base: list[str]
    env: dict[str, str]
    sysfs: FakeSysfs
    log_file: Path

    def run(
        self, *args: str, stdin: str | None = None, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*self.base, *args],
            env=self.env,
            input=stdin,
            text=True,
            capture_output=True,
            timeout=120,
        )
        if check:
            assert result.returncode == 0, result.stderr
        return result


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    top = tmp_path_factory.mktemp("podman")
    fs = engine_host(top / "sys")
    log_file = top / "kata-vfio.log"
    config = top / "kata-vfio.toml"
    config.write_text(
        f'runtime = "runc"\nsysfs = "{fs.root}"\nlog_file = "{log_file}"\n'
        f'state_dir = "{top / "state"}"\n'
        # runc stands in for Kata: without CAP_SYS_RESOURCE here it cannot raise
        # RLIMIT_MEMLOCK (Kata applies it inside the guest); the raise has its own tests
        "raise_memlock = false\n"
        '[annotations]\n"io.katacontainers.config.hypervisor.enable_iommu" = "true"\n'
    )
    # podman gives runtimes a clean environment: a launcher named kata-vfio carries the
    # config path (podman keys runtime features by basename, so the name matters)
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
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    base = [
        "podman",
        "--root",
        str(top / "storage"),
        "--runroot",
        str(top / "run"),
        "--storage-driver",
        "vfs",
        "--runtime",
        "kata-vfio",
    ]
    rootfs = busybox_rootfs(top / "rootfs", ("sh", "cat", "stat", "sleep", "ls", "echo"))
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(top / "rootfs.tar"), "."], check=True)
    pm = Podman(base, env, fs, log_file)
    pm.run("import", str(top / "rootfs.tar"), IMAGE, check=True)
    yield pm
    pm.run("rm", "--all", "--force")


def node_numbers(pm: Podman, *args: str) -> dict[str, str]:
    result = pm.run(*args, check=True)
    return dict(line.split(" ", 1)[::-1] for line in result.stdout.split("\n") if line.strip())


def test_run_rm_passes_stdin_and_exit_code_and_creates_nodes(podman: Podman) -> None:
    result = podman.run(
        "run",
        "--rm",
        "-i",
        "--annotation",
        f"{DEVICES}=0000:04:00.1",
        IMAGE,
        "sh",
        "-c",
        "cat; stat -c '%F %t:%T %n' /dev/vfio/vfio /dev/vfio/13; exit 3",
        stdin="piped through\n",
    )
    assert result.returncode == 3, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "piped through"
    # major:minor in hex, as stat prints them: 10:196 = a:c4, 243:1 = f3:1
    assert lines[1:] == [
        "character special file a:c4 /dev/vfio/vfio",
        "character special file f3:1 /dev/vfio/13",
    ]


def test_detached_exec_stop_rm_and_the_spec_runc_received(podman: Podman) -> None:
    # podman splits --annotation at commas unless the value is CSV-quoted
    cid = podman.run(
        "run",
        "-d",
        "--annotation",
        f'"{DEVICES}=0000:03:00.0,0000:04:00.0"',
        IMAGE,
        "sleep",
        "600",
        check=True,
    ).stdout.strip()
    try:
        config_path = podman.run(
            "inspect", "--format", "{{.OCIConfigPath}}", cid, check=True
        ).stdout.strip()
        spec = json.loads(Path(config_path).read_text())
        nodes = {d["path"]: (d["major"], d["minor"]) for d in spec["linux"]["devices"]}
        assert nodes["/dev/vfio/vfio"] == (10, 196)
        assert nodes["/dev/vfio/12"] == (243, 0) and nodes["/dev/vfio/13"] == (243, 1)
        rules = spec["linux"]["resources"]["devices"]
        for major, minor in ((10, 196), (243, 0), (243, 1)):
            assert {
                "allow": True,
                "type": "c",
                "major": major,
                "minor": minor,
                "access": "rwm",
            } in rules
        annotations = spec["annotations"]
        manifest = Manifest.from_json(annotations[MANIFEST_ANNOTATION])
        assert {str(d.host_address) for d in manifest.devices} == {
            "0000:03:00.0",
            "0000:04:00.0",
            "0000:04:00.1",
        }  # the whole of group 13
        assert annotations[GUEST_HOOK_PATH_ANNOTATION] == "/usr/share/oci/hooks"
        assert annotations["io.katacontainers.config.hypervisor.enable_iommu"] == "true"
        # podman's own entries (fileMode 8630 etc.) are outside what we validate; what we
        # added must satisfy the official schema
        ours = {
            **spec,
            "linux": {
                **spec["linux"],
                "devices": [
                    d for d in spec["linux"]["devices"] if d["path"].startswith("/dev/vfio/")
                ],
            },
        }
        assert schema_errors(ours) == []
        seen = node_numbers(
            podman,
            "exec",
            cid,
            "stat",
            "-c",
            "%t:%T %n",
            "/dev/vfio/vfio",
            "/dev/vfio/12",
            "/dev/vfio/13",
        )
        assert seen == {"/dev/vfio/vfio": "a:c4", "/dev/vfio/12": "f3:0", "/dev/vfio/13": "f3:1"}
        podman.run("stop", "-t", "1", cid, check=True)
    finally:
        podman.run("rm", "--force", cid)
    assert podman.run("inspect", cid).returncode != 0
    events = [json.loads(line) for line in podman.log_file.read_text().splitlines()]
    mine = [e for e in events if e.get("container_id") == cid]
    assert mine and mine[0]["event"] == "spec edited" and mine[0]["edit_ms"] > 0


def test_device_flag_with_a_host_group_node(podman: Podman, tmp_path: Path) -> None:
    host_node = tmp_path / "12"
    os.mknod(host_node, 0o600 | 0o020000, os.makedev(243, 0))
    result = podman.run(
        "run",
        "--rm",
        "--device",
        f"{host_node}:/dev/vfio/12",
        IMAGE,
        "stat",
        "-c",
        "%t:%T %n",
        "/dev/vfio/vfio",
        "/dev/vfio/12",
        check=True,
    )
    assert result.stdout.split("\n")[:2] == ["a:c4 /dev/vfio/vfio", "f3:0 /dev/vfio/12"]


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        ("0000:09:00.0", "no PCI device 0000:09:00.0 on this host"),
        ("0000:zz:00.0", "malformed PCI address '0000:zz:00.0'"),
    ],
)
def test_bad_request_fails_podman_run_with_the_wrappers_message(
    podman: Podman, annotation: str, message: str
) -> None:
    result = podman.run("run", "--rm", "--annotation", f"{DEVICES}={annotation}", IMAGE, "true")
    assert result.returncode != 0
    assert message in result.stderr
    assert "Error: OCI runtime error: kata-vfio: " in result.stderr
