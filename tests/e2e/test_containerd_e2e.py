"""A private, real containerd 1.6 running containers through containerd-shim-kata-vfio-v2.

The inner shim is containerd-shim-runc-v2 (the stand-in for containerd-shim-kata-v2:
no Kata 2+/3 container can start on this machine); the host view of PCI is a fake
sysfs. Everything else is real: containerd's shim protocol (start with the bundle as
working directory, the address read from start's output, the ttrpc server the inner
shim forks, the delete clean-up action), ctr, runc and the device nodes it makes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fakesys import engine_host
from wrapper_run import busybox_rootfs, installed, private_containerd_config

pytestmark = [
    pytest.mark.containerd,
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("containerd"),
        reason="needs root and containerd (Debian's containerd package)",
    ),
]
RUNTIME = "io.containerd.kata-vfio.v2"
DEVICES = "io.kata-vfio.devices"


@dataclass
class Containerd:
    sock: Path
    state_dir: Path
    task_root: Path
    log_file: Path
    rootfs: Path
    env: dict[str, str]

    def ctr(
        self, *args: str, check: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["ctr", "--address", str(self.sock), *args],
            env=self.env,
            text=True,
            capture_output=True,
            timeout=timeout,
        )
        if check:
            assert result.returncode == 0, result.stderr
        return result

    def run(
        self, cid: str, *cmd: str, annotation: str | None = None, extra: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        args = ["run", "--rm", "--runtime", RUNTIME, *extra]
        if annotation:
            args += ["--annotation", f"{DEVICES}={annotation}"]
        return self.ctr(*args, "--rootfs", str(self.rootfs), cid, *cmd)

    def marker(self, cid: str) -> Path:
        return self.state_dir / "containers" / cid

    def claims(self) -> dict[str, dict[str, object]]:
        from ledgerfiles import claims

        return claims(self.state_dir)


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    top = tmp_path_factory.mktemp("containerd")
    fs = engine_host(top / "sys")
    state_dir = top / "state"
    log_file = top / "kata-vfio.log"
    config = top / "kata-vfio.toml"
    config.write_text(
        f'shim = "containerd-shim-runc-v2"\nsysfs = "{fs.root}"\n'
        f'log_file = "{log_file}"\nstate_dir = "{state_dir}"\n'
        # runc stands in for Kata: without CAP_SYS_RESOURCE here it cannot
        # raise RLIMIT_MEMLOCK (Kata applies it inside the guest)
        "raise_memlock = false\n"
    )
    # containerd finds containerd-shim-kata-vfio-v2 on its PATH, and hands its own
    # environment (KATA_VFIO_CONFIG) to the shims it starts
    bindir = top / "bin"
    bindir.mkdir()
    (bindir / "containerd-shim-kata-vfio-v2").symlink_to(installed("containerd-shim-kata-vfio-v2"))
    env = {
        **os.environ,
        "KATA_VFIO_CONFIG": str(config),
        "PATH": f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
    }
    cfg, sock, tasks = private_containerd_config(top)
    rootfs = busybox_rootfs(top / "rootfs")
    daemon_log = open(top / "containerd.log", "w")  # noqa: SIM115
    daemon = subprocess.Popen(
        ["containerd", "--config", str(cfg)], env=env, stdout=daemon_log, stderr=subprocess.STDOUT
    )
    cd = Containerd(sock, state_dir, tasks, log_file, rootfs, env)
    deadline = time.monotonic() + 30
    while cd.ctr("version").returncode != 0:
        assert daemon.poll() is None, (top / "containerd.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "containerd did not come up"
        time.sleep(0.2)
    yield cd
    for line in cd.ctr("tasks", "ls", "-q").stdout.split():
        cd.ctr("tasks", "kill", "-s", "SIGKILL", line)
    for line in cd.ctr("containers", "ls", "-q").stdout.split():
        cd.ctr("tasks", "delete", "-f", line)
        cd.ctr("containers", "delete", line)
    daemon.send_signal(signal.SIGTERM)
    daemon.wait(timeout=30)
    daemon_log.close()


def stat_nodes(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert result.returncode == 0, result.stderr
    return dict(line.split(" ", 1)[::-1] for line in result.stdout.splitlines() if line.strip())


def test_vfio_container_gets_its_nodes(containerd: Containerd) -> None:
    result = containerd.run(
        "nodes1",
        "/bin/stat",
        "-c",
        "%t:%T %n",
        "/dev/vfio/vfio",
        "/dev/vfio/13",
        annotation="0000:04:00.1",
    )
    assert stat_nodes(result) == {"/dev/vfio/vfio": "a:c4", "/dev/vfio/13": "f3:1"}
    events = [json.loads(line) for line in containerd.log_file.read_text().splitlines()]
    mine = [e for e in events if e.get("container_id") == "nodes1"]
    assert mine[0]["event"] == "spec edited" and mine[0]["verb"] == "shim start"
    # ctr run --rm deletes over ttrpc: the bundle is gone, so the claim owns nothing
    assert not (containerd.task_root / "default" / "nodes1").exists()


def test_plain_container_runs_untouched(containerd: Containerd) -> None:
    result = containerd.run("plain1", "/bin/sh", "-c", "ls /dev/vfio 2>&1; echo done")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "done"
    assert "No such file" in result.stdout
    assert not containerd.marker("plain1").exists()


def test_unknown_address_fails_ctr_run_with_the_wrappers_line(containerd: Containerd) -> None:
    result = containerd.run("bad1", "/bin/true", annotation="0000:09:00.0")
    assert result.returncode != 0
    assert "containerd-shim-kata-vfio-v2: no PCI device 0000:09:00.0 on this host" in result.stderr
    assert not containerd.marker("bad1").exists()


def start_detached(cd: Containerd, cid: str, annotation: str, extra: tuple[str, ...] = ()) -> None:
    cd.ctr(
        "run",
        "-d",
        "--null-io",
        "--runtime",
        RUNTIME,
        "--annotation",
        f"{DEVICES}={annotation}",
        *extra,
        "--rootfs",
        str(cd.rootfs),
        cid,
        "/bin/sleep",
        "600",
        check=True,
    )


def remove(cd: Containerd, cid: str) -> None:
    cd.ctr("tasks", "kill", "-s", "SIGKILL", cid)
    deadline = time.monotonic() + 20
    while cd.ctr("tasks", "delete", cid).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    cd.ctr("containers", "delete", cid, check=True)


def test_a_group_in_use_is_refused_until_its_owner_is_deleted(containerd: Containerd) -> None:
    start_detached(containerd, "own1", "0000:03:00.0")
    try:
        assert containerd.claims()["12"]["container"] == "own1"
        refused = containerd.run("own2", "/bin/true", annotation="0000:03:00.0")
        assert refused.returncode != 0
        assert "IOMMU group 12 is in use by container own1" in refused.stderr
    finally:
        remove(containerd, "own1")
    # containerd deleted own1 over ttrpc, not through the wrapper: its bundle is gone,
    # so its claim owns nothing and the next create takes the group
    result = containerd.run(
        "own2", "/bin/stat", "-c", "%t:%T %n", "/dev/vfio/12", annotation="0000:03:00.0"
    )
    assert stat_nodes(result) == {"/dev/vfio/12": "f3:0"}


def test_pod_style_group_of_two_containers(containerd: Containerd) -> None:
    """A CRI pod through one shim: the pod's annotation asking for a device reaches the
    sandbox's spec and the app container's (containerd's pod_annotations); the sandbox
    claims nothing and gets no node, the app container gets the device."""
    pod_ask = "0000:03:00.0"
    start_detached(
        containerd,
        "pod1",
        pod_ask,
        (
            "--annotation",
            "io.kubernetes.cri.container-type=sandbox",
            "--annotation",
            "io.kubernetes.cri.sandbox-id=pod1",
        ),
    )
    try:
        assert containerd.claims() == {}
        none = containerd.ctr("tasks", "exec", "--exec-id", "x0", "pod1", "/bin/ls", "/dev")
        assert none.returncode == 0 and "vfio" not in none.stdout.split(), none.stdout
        start_detached(
            containerd,
            "pod1-app",
            pod_ask,
            (
                "--annotation",
                "io.kubernetes.cri.container-type=container",
                "--annotation",
                "io.kubernetes.cri.sandbox-id=pod1",
            ),
        )
        try:
            claims = containerd.claims()
            assert {g: c["container"] for g, c in claims.items()} == {"12": "pod1-app"}
            seen = containerd.ctr(
                "tasks",
                "exec",
                "--exec-id",
                "x1",
                "pod1-app",
                "/bin/stat",
                "-c",
                "%t:%T %n",
                "/dev/vfio/12",
            )
            assert stat_nodes(seen) == {"/dev/vfio/12": "f3:0"}
        finally:
            remove(containerd, "pod1-app")
    finally:
        remove(containerd, "pod1")


def test_shim_delete_after_the_server_was_killed(containerd: Containerd) -> None:
    """containerd runs `<shim> … delete` itself when the shim server died: that action goes
    through the wrapper, which hands the devices back after the inner shim's clean-up."""
    start_detached(containerd, "dead1", "0000:03:00.0")
    assert containerd.marker("dead1").exists()
    servers = subprocess.run(
        ["pgrep", "-f", "containerd-shim-runc-v2.*-id dead1"], capture_output=True, text=True
    ).stdout.split()
    assert servers, "no shim server for dead1"
    for pid in servers:
        os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while containerd.marker("dead1").exists() and time.monotonic() < deadline:
        containerd.ctr("tasks", "delete", "-f", "dead1")
        time.sleep(0.5)
    assert not containerd.marker("dead1").exists()
    assert "12" not in containerd.claims()
    containerd.ctr("containers", "delete", "dead1")
