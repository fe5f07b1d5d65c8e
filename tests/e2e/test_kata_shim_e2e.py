"""The shim path on real parts: ctr → containerd 1.6 → containerd-shim-kata-vfio-v2 →
Kata 1.x's containerd-shim-kata-v2 → a TCG guest → kata-agent → our guest hook.

A private containerd (own root, state, socket; CRI plugin off) runs in a private mount
namespace in which /etc/kata-containers (or /usr/share/defaults/kata-containers) holds the
test's Kata configuration: the 1.x shim reads no other path (LAB.md section 4), and the host
stays untouched. `ctr run -d --null-io --runtime io.containerd.kata-vfio.v2` starts the
container through our shim wrapper; its inner shim (config.toml `shim`) is a test-only script
that drops the /dev/vfio/<N> host-group entries (no IOMMU here, so no host hot-plug) and execs
the user's installed Kata 1.x containerd-shim-kata-v2 (KATA_VFIO_KATA_SHIM_V2, see
tests/kata/installed.py). The host PCI view is a fake sysfs; the QEMU launcher
gives the guest two e1000e standing for the two host devices asked for.

Output: the 1.x shim deadlocks `ctr run -d` without --null-io (stdin FIFO), and --null-io
drops the container's stdout. `ctr tasks exec` is no way out: it has no --null-io, always
opens FIFOs, and wedged the 1.x shim the same way when tried here (the exec did not return
within 120 s, nor did the `ctr tasks kill` after it). The container therefore writes what
it sees into a host directory bind-mounted into it (Kata shares it with the guest over 9p);
the hook's own log reaches the guest console through the test relay hook (tests/kata/guest/), as in
test_kata_e2e.py.

Against an installed Kata only (`make test-kata`): skipped when none is given, unless
KATA_VFIO_REQUIRE_KATA=1 (set by `make test-kata`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fakesys import FakeSysfs
from kata import harness, rootfs, shim_harness
from kata.env import Unavailable, kata1_host
from wrapper_run import private_containerd_config

REPO = Path(__file__).resolve().parents[2]
RUNTIME = "io.containerd.kata-vfio.v2"
DEVICES = "io.kata-vfio.devices"
HOST_NICS = ("0000:03:00.0", "0000:04:00.0")
HOST_GROUPS = ("12", "13")
HOTPLUG_TIMEOUT = 1.0
REQUIRE = os.environ.get("KATA_VFIO_REQUIRE_KATA") == "1"

pytestmark = [pytest.mark.kata]


def need(ok: bool, reason: str) -> None:
    if not ok:
        if REQUIRE:
            pytest.fail(f"KATA_VFIO_REQUIRE_KATA=1: {reason}")
        pytest.skip(reason)


@dataclass
class Shim:
    top: Path
    sock: Path
    env: dict[str, str]
    rootfs: Path
    console_dir: Path
    inner_log: Path
    log_file: Path
    state_dir: Path
    task_root: Path
    config: Path
    timings: dict[str, float] = field(default_factory=dict)

    def ctr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ctr", "--address", str(self.sock), *args],
            env=self.env,
            text=True,
            capture_output=True,
            timeout=timeout,
        )

    def console(self, cid: str) -> str:
        return harness.console_text(self.console_dir, cid)

    def hook_log(self, cid: str) -> list[dict[str, object]]:
        return harness.relayed_hook_log(self.console(cid))

    def claims(self) -> dict[str, dict[str, object]]:
        from ledgerfiles import claims

        return claims(self.state_dir)

    def remove(self, cid: str) -> None:
        self.ctr("tasks", "kill", "-s", "SIGKILL", cid)
        deadline = time.monotonic() + 60
        while self.ctr("tasks", "delete", cid).returncode != 0 and time.monotonic() < deadline:
            if "not found" in self.ctr("tasks", "ls").stdout:
                break
            time.sleep(0.5)
        self.ctr("containers", "delete", cid)


@pytest.fixture(scope="module")
def shim(request: pytest.FixtureRequest) -> Iterator[Shim]:
    with harness.run_directory(request, "kata-vfio-kata-shim.", "kata shim e2e") as top:
        yield from _shim(top)


def _shim(top: Path) -> Iterator[Shim]:
    tools = {
        t: "Debian's containerd, util-linux" for t in ("containerd", "ctr", "unshare", "mountpoint")
    }
    try:
        host = kata1_host("containerd-shim-kata-vfio-v2", tools, shim_v2=True)
    except Unavailable as exc:
        need(False, str(exc))
        raise
    wrapper, ctl, kver, kernel = host.wrapper, host.ctl, host.kver, host.kernel
    bins, timings = host.bins, host.timings

    console_dir, kata_config = harness.prepare_kata(top, kver, kernel, bins, timings)
    inner_log = top / "inner-shim.log"
    inner = shim_harness.write_inner_shim(
        top / "bin/kata-shim-test", bins["containerd-shim-kata-v2"], inner_log
    )

    fs = FakeSysfs(top / "sys")
    for addr, group, minor in zip(HOST_NICS, HOST_GROUPS, (0, 1), strict=True):
        fs.add_device(addr, group=int(group), driver="vfio-pci")
        fs.add_vfio_group(int(group), minor=minor)
    state_dir = top / "state"
    log_file = top / "kata-vfio.log"
    config = top / "kata-vfio.toml"
    config.write_text(
        f'shim = "{inner}"\nsysfs = "{fs.root}"\nlog_file = "{log_file}"\n'
        f'state_dir = "{state_dir}"\nhotplug_timeout = {HOTPLUG_TIMEOUT}\n'
    )
    # the kata-vfio settings in Kata's file: the product's step (podman's registration
    # goes to a throwaway file; containerd needs none for `ctr run --runtime`)
    subprocess.run(
        [
            str(ctl),
            "install",
            "--kata-config",
            str(kata_config),
            "--conf",
            str(top / "containers.conf"),
            "--runtime-path",
            str(wrapper),
        ],
        env={**os.environ, "KATA_VFIO_CONFIG": str(config)},
        check=True,
        capture_output=True,
        text=True,
    )

    # containerd finds containerd-shim-kata-vfio-v2 on its PATH and hands its environment
    # (KATA_VFIO_CONFIG) to the shims
    bindir = top / "bin"
    (bindir / "containerd-shim-kata-vfio-v2").symlink_to(wrapper)
    env = {
        **os.environ,
        "KATA_VFIO_CONFIG": str(config),
        "PATH": f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
    }
    cfg, sock, tasks = private_containerd_config(top)
    script = shim_harness.namespace_script(
        kata_config, top / "ns", harness.SHARED_SANDBOXES, ["containerd", "--config", str(cfg)]
    )
    (top / "ns.sh").write_text(script)
    root = rootfs.busybox_rootfs(top / "busybox")
    for applet in ("sort", "tr", "mv"):  # SEE_SCRIPT's, beyond rootfs.BUSYBOX_APPLETS
        (root / "bin" / applet).symlink_to("busybox")

    with contextlib.ExitStack() as stack:
        stack.enter_context(harness.syslog(top / "syslog.log"))
        daemon_log = stack.enter_context((top / "containerd.log").open("w"))
        daemon = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", str(top / "ns.sh")],
            env=env,
            stdout=daemon_log,
            stderr=subprocess.STDOUT,
        )
        s = Shim(
            top,
            sock,
            env,
            root,
            console_dir,
            inner_log,
            log_file,
            state_dir,
            tasks,
            config,
            timings,
        )
        try:
            deadline = time.monotonic() + 30
            while s.ctr("version").returncode != 0:
                assert daemon.poll() is None, (top / "containerd.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "containerd did not come up"
                time.sleep(0.2)
            yield s
        finally:
            for cid in s.ctr("tasks", "ls", "-q").stdout.split():
                s.remove(cid)
            for cid in s.ctr("containers", "ls", "-q").stdout.split():
                s.ctr("containers", "delete", cid)
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
            harness.kill_pids(harness.qemu_pids(str(console_dir)))
            rounded = {x: round(y, 1) for x, y in timings.items()}
            print(f"\nkata shim e2e timings (s): {json.dumps(rounded)}")


# Runs in the container: what it sees goes to the bind-mounted /out (stdout is --null-io's)
SEE_SCRIPT = """
exec >/out/seen.tmp 2>&1
ls /dev/vfio | sort | tr '\\n' ' '; echo
for n in /dev/vfio/*; do stat -c "node %n %t:%T %F" "$n"; done
for n in /dev/vfio/*; do if exec 3<>"$n"; then echo "opened $n"; exec 3>&-; fi; done
mv /out/seen.tmp /out/seen
exec sleep 600
"""


def shim_pids(cid: str) -> list[int]:
    r = subprocess.run(
        ["pgrep", "-f", f"containerd-shim-kata-v2.*-id {cid}( |$)"], capture_output=True, text=True
    )
    return [int(p) for p in r.stdout.split()]


def test_container_in_the_kata_guest_gets_its_nodes_through_the_shim(shim: Shim) -> None:
    cid = f"kvshim-{os.getpid()}"  # unique: Kata keeps state under /run/vc by id
    out = shim.top / "out"
    out.mkdir()
    started = time.monotonic()
    r = shim.ctr(
        "run",
        "-d",
        "--null-io",
        "--runtime",
        RUNTIME,
        "--annotation",
        f"{DEVICES}={','.join(HOST_NICS)}",
        "--mount",
        f"type=bind,src={out},dst=/out,options=rbind:rw",
        "--rootfs",
        str(shim.rootfs),
        cid,
        "/bin/sh",
        "-c",
        SEE_SCRIPT,
        timeout=240,
    )
    shim.timings["ctr run -d (to return)"] = time.monotonic() - started
    assert r.returncode == 0, r.stderr + shim.console(cid)[-3000:]
    try:
        deadline = time.monotonic() + 120
        while not (out / "seen").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        shim.timings["ctr run -d to the container's output"] = time.monotonic() - started
        assert (out / "seen").exists(), shim.console(cid)[-3000:]
        seen = (out / "seen").read_text().splitlines()
        print(f"\ncontainer {cid} sees:\n" + "\n".join(seen))
        groups = seen[0].split()
        assert "vfio" in groups and len(groups) == 3, seen  # vfio + one group per e1000e
        nodes = {x.split()[1]: x.split()[2] for x in seen if x.startswith("node ")}
        assert nodes["/dev/vfio/vfio"] == "a:c4", seen
        assert all(n.split(":")[0] != "a" for p, n in nodes.items() if p != "/dev/vfio/vfio")
        assert sorted(x.split()[1] for x in seen if x.startswith("opened ")) == sorted(
            f"/dev/vfio/{g}" for g in groups
        )
        # it ran in the Kata guest: a QEMU for this sandbox, served by the real 1.x shim
        assert harness.qemu_pids(cid), "no QEMU for the container"
        assert shim_pids(cid), "no containerd-shim-kata-v2 server for the container"
        # kata-agent ran our hook for this container (its log, relayed through the console)
        log = shim.hook_log(cid)
        done = [x for x in log if x.get("event") == "done"]
        assert done and done[-1].get("container_id") == cid, log or shim.console(cid)[-3000:]
        mapping = done[-1]["host_to_guest"]
        assert isinstance(mapping, dict) and sorted(mapping) == sorted(HOST_NICS), mapping
        # the launcher's two e1000e (harness.E1000E_ARGS: root bus slots 0x1a, 0x1b)
        assert sorted(mapping.values()) == ["0000:00:1a.0", "0000:00:1b.0"], mapping
        # our wrapper edited the spec on `start`, the stand-in dropped the host groups
        events = [json.loads(x) for x in shim.log_file.read_text().splitlines()]
        mine = [e for e in events if e.get("container_id") == cid]
        assert mine and mine[0]["event"] == "spec edited" and mine[0]["verb"] == "shim start"
        inner = [json.loads(x) for x in shim.inner_log.read_text().splitlines()]
        assert any(cid in e["argv"] and e["dropped"] == 2 for e in inner), inner
        assert sorted(g for g, c in shim.claims().items() if c["container"] == cid) == sorted(
            HOST_GROUPS
        )
    finally:
        t = time.monotonic()
        shim.remove(cid)
        shim.timings["ctr tasks kill + delete"] = time.monotonic() - t
    deadline = time.monotonic() + 20
    while (harness.qemu_pids(cid) or shim_pids(cid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not harness.qemu_pids(cid), "QEMU outlived the container"
    assert not shim_pids(cid), "the shim server outlived the container"
    # containerd deleted over ttrpc, never through the wrapper: the bundle is gone, so the
    # claim owns nothing any more, and restore --stale says so and drops it
    assert not (shim.task_root / "default" / cid).exists()
    r = subprocess.run(
        [str(Path(sys.executable).with_name("kata-vfio-ctl")), "restore", "--stale"],
        env={**os.environ, "KATA_VFIO_CONFIG": str(shim.config)},
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert f"container {cid} is gone" in r.stdout, r.stdout
    assert not any(c["container"] == cid for c in shim.claims().values())
