"""A real CRI-O (v1.34, built from its Go module: tests/k8s/crio_build.py) with the drop-in
`kata-vfio-ctl crio-register` writes, driven with crictl (issue 17: a doctor for every
engine; issue 16's CRI-O product text). The kata-vfio handler is `runtime_type = "vm"`:
CRI-O itself starts containerd-shim-kata-vfio-v2 over the containerd shim v2 protocol,
whose inner shim is runc's (tests/k8s/crio_node.py: the stand-in for Kata's). Host PCI
view: `engine_host`'s fake sysfs (group 12: 0000:03:00.0; group 13: 0000:04:00.0 and .1).
What a user observes: the handler CRI-O reports, doctor's lines, the pod's output, who
holds a group.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fakesys import engine_host
from k8s.build import BuildError
from k8s.build import ensure_built as k8s_built
from k8s.crio_build import ensure_built as crio_built
from k8s.crio_node import HANDLER, CrioNode, crio_node, require_tools
from wrapper_run import installed

pytestmark = [pytest.mark.crio]
DEVICES = "io.kata-vfio.devices"
MANIFEST = "io.kata-vfio.manifest"
STAT_AND_WAIT = [
    "/bin/sh",
    "-c",
    "stat -c '%t:%T %n' /dev/vfio/vfio /dev/vfio/13; echo ready; exec sleep 600",
]


def _node(top: Path) -> Iterator[CrioNode]:
    if os.geteuid() != 0:
        pytest.skip("needs root (CRI-O, runc)")
    missing = require_tools()
    if missing:
        pytest.skip(missing)
    try:
        crio_bins = crio_built(install_go=True, log=True)
        crictl = k8s_built(install_go=True, log=True) / "crictl"
    except BuildError as e:
        pytest.fail(f"no CRI-O or crictl: {e}")
    fs = engine_host(top / "sys")
    with crio_node(
        top,
        fs,
        crio_bins,
        crictl,
        installed("containerd-shim-kata-vfio-v2"),
        installed("kata-vfio-ctl"),
    ) as node:
        yield node


@pytest.fixture(scope="module")
def crio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrioNode]:
    """CRI-O running with the drop-in crio-register wrote (runc as its default runtime)."""
    for node in _node(tmp_path_factory.mktemp("crio")):
        registered = node.register()
        assert registered.returncode == 0, registered.stderr
        node.load_images()
        node.start()
        yield node


def node_lines(text: str) -> dict[str, str]:
    """`stat -c '%t:%T %n'` output -> path: major:minor (hex)."""
    return {
        m.group(2): m.group(1)
        for m in re.finditer(r"^([0-9a-f]+:[0-9a-f]+) (/dev/\S+)$", text, re.M)
    }


def started_app(crio: CrioNode, name: str, annotations: dict[str, str]) -> tuple[str, str]:
    """A pod on the kata-vfio handler and its app container, started; (pod, container)."""
    pod = crio.run_pod(name, annotations)
    ctr = crio.create_container(pod, name, STAT_AND_WAIT)
    crio.crictl_ok("start", ctr)
    crio.wait_for(
        lambda: "ready" in crio.crictl_run("logs", ctr).stdout,
        60,
        f"{name}'s container to print ready",
    )
    return pod, ctr


def holders(crio: CrioNode) -> dict[int, str]:
    """group -> container id holding it now (the ledger's own reader: live claims only)."""
    from kata_vfio_ctl.plugin_ledger import live_holders
    from kata_vfio_host.ledger import Host

    return live_holders(Host(crio.fs.root, crio.state_dir))


def test_crio_runs_with_the_registered_dropin_and_reports_the_handler(crio: CrioNode) -> None:
    info = crio.crictl_json("info")
    handlers = [h.get("name") for h in info["runtimeHandlers"]]
    assert HANDLER in handlers and "runc" in handlers, handlers
    # the drop-in as CRI-O itself merged it into its running configuration
    runtime = info["config"]["crio"]["Runtimes"][HANDLER]
    assert runtime["RuntimeType"] == "vm" and runtime["RuntimePath"] == str(crio.shim)
    assert runtime["RuntimeRoot"] == str(crio.top / "vm-root")


def test_doctor_checks_the_real_crio_node(crio: CrioNode) -> None:
    from kata_vfio_ctl.checks import FAIL, OK
    from kata_vfio_ctl.doctor import check_engines
    from kata_vfio_host.settings import Settings

    checks = {
        c.name: c
        for c in check_engines(crio.root, crio.root / "no-podman.conf", None, Settings(), "3.30")
    }
    assert checks["cri-o"].status == OK, checks["cri-o"]
    # the real binary's own version line, and the drop-in CRI-O is running with
    assert checks["cri-o"].detail.startswith("crio version 1.34.0: ")
    assert str(crio.dropin) in checks["cri-o"].detail
    assert checks["cri-o:shim"].status == OK and checks["cri-o:shim"].detail == str(crio.shim)
    assert "cri-o:runtime-root" not in checks and "cri-o:annotations" not in checks
    # the running CRI-O, asked over its socket, has the handler
    assert checks["cri-o:running"].status == OK, checks["cri-o:running"]
    assert checks["cri-o:running"].detail == (
        f"the CRI-O running at {crio.sock} serves runtime handler kata-vfio"
    )
    # what truly is missing here: Kata itself (runc's shim stands in for it)
    assert checks["cri-o:kata"].status == FAIL
    assert "no containerd-shim-kata-v2" in checks["cri-o:kata"].detail


def test_a_pod_on_the_kata_vfio_handler_gets_its_devices_and_gives_them_back(
    crio: CrioNode,
) -> None:
    pod, ctr = started_app(crio, "vfio1", {DEVICES: "0000:04:00.1"})
    removed = False
    try:
        out = crio.crictl_ok("logs", ctr)
        assert node_lines(out) == {"/dev/vfio/vfio": "a:c4", "/dev/vfio/13": "f3:1"}, out
        # the pod's annotation reached the sandbox's spec too: it claims nothing (the app
        # container holds the group), as the shim wrapper decides from CRI-O's
        # io.kubernetes.cri-o.ContainerType
        assert holders(crio) == {13: ctr}
        claim = crio.claims()["13"]
        assert os.path.isdir(claim["bundle"])
        mine = [e for e in crio.events() if e.get("container_id") == ctr]
        assert mine and mine[0]["event"] == "spec edited" and mine[0]["verb"] == "shim start"
        inspect = crio.crictl_json("inspectp", "-o", "json", pod)
        assert inspect["status"]["state"] == "SANDBOX_READY"
        assert inspect["info"]["runtimeSpec"]["annotations"][DEVICES] == "0000:04:00.1"
        assert MANIFEST not in inspect["info"]["runtimeSpec"]["annotations"]
        crio.remove_pod(pod)
        removed = True
        # CRI-O removed the container and its bundle: the claim owns nothing
        assert not os.path.isdir(claim["bundle"])
        assert holders(crio) == {}
        # and the next pod asking for the group gets it
        pod2, ctr2 = started_app(crio, "vfio2", {DEVICES: "0000:04:00.0"})
        try:
            assert node_lines(crio.crictl_ok("logs", ctr2))["/dev/vfio/13"] == "f3:1"
            assert holders(crio) == {13: ctr2}
        finally:
            crio.remove_pod(pod2)
        assert holders(crio) == {}
    finally:
        if not removed:
            crio.remove_pod(pod)


def test_a_group_in_use_is_refused_with_the_wrappers_line(crio: CrioNode) -> None:
    pod, ctr = started_app(crio, "own1", {DEVICES: "0000:03:00.0"})
    try:
        second = crio.run_pod("own2", {DEVICES: "0000:03:00.0"})
        try:
            path = crio.top / "own2-ctr.json"
            path.write_text(json.dumps(crio.container_config(STAT_AND_WAIT)))
            created = crio.crictl_run("create", second, str(path), str(crio.top / "own2-pod.json"))
            assert created.returncode != 0
            assert f"IOMMU group 12 is in use by container {ctr}" in created.stderr
            assert holders(crio) == {12: ctr}
        finally:
            crio.remove_pod(second)
    finally:
        crio.remove_pod(pod)
    assert holders(crio) == {}


def test_a_crio_restart_keeps_the_running_pod_and_its_claim(crio: CrioNode) -> None:
    """crio-register ends with "restart CRI-O to use it": a restart with a VFIO pod running
    leaves the pod, its shim and its claim alone; CRI-O reconnects to the shim, and
    removing the pod afterwards still gives the group back."""
    pod, ctr = started_app(crio, "keep1", {DEVICES: "0000:03:00.0"})
    try:
        crio.stop()
        assert holders(crio) == {12: ctr}
        crio.start()
        status = crio.crictl_json("inspect", "-o", "json", ctr)["status"]
        assert status["state"] == "CONTAINER_RUNNING"
        seen = crio.crictl_run("exec", ctr, "/bin/stat", "-c", "%t:%T %n", "/dev/vfio/12")
        assert seen.returncode == 0, seen.stderr
        assert node_lines(seen.stdout) == {"/dev/vfio/12": "f3:0"}
        assert holders(crio) == {12: ctr}
    finally:
        crio.remove_pod(pod)
    assert holders(crio) == {}


def test_a_dropin_without_runtime_root_fails_every_pod_and_doctor_says_so(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Issue 17 defect found with the real CRI-O: the drop-in crio-register wrote before
    had no runtime_root; CRI-O then makes the shim's stdio FIFOs under the relative path
    crio/fifo (from its own working directory) and the shim opens that path from the
    bundle: no pod on the kata-vfio handler can start. doctor now names it."""
    from kata_vfio_ctl.checks import FAIL
    from kata_vfio_ctl.doctor import check_engines
    from kata_vfio_host.settings import Settings

    for node in _node(tmp_path_factory.mktemp("crio-old")):
        assert node.register().returncode == 0
        old = "".join(
            line
            for line in node.dropin.read_text().splitlines(keepends=True)
            if not line.startswith("runtime_root")
        )
        node.dropin.write_text(old)  # what crio-register wrote before the fix
        checks = {
            c.name: c
            for c in check_engines(
                node.root, node.root / "no-podman.conf", None, Settings(), "3.30"
            )
        }
        check = checks["cri-o:runtime-root"]
        assert check.status == FAIL and "crio/fifo" in check.detail
        assert check.fix.startswith("kata-vfio-ctl crio-register")
        node.load_images()
        node.start()
        config = node.top / "old-pod.json"
        config.write_text(json.dumps(node.pod_config("old", {DEVICES: "0000:03:00.0"})))
        refused = node.crictl_run("runp", "--runtime", HANDLER, str(config))
        assert refused.returncode != 0
        assert re.search(
            r"opening file \\?\"crio/fifo/io/\S+ failed: .*no such file or "
            "directory",
            refused.stderr,
        ), refused.stderr
        assert holders(node) == {}


def test_doctor_says_restart_crio_when_it_started_before_the_registration(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Issue 17 ("does not say that CRI-O must be restarted"): the drop-in is there, the
    running CRI-O has not read it and refuses the handler; doctor asks the running CRI-O
    and says to restart it, and is content once it was."""
    from kata_vfio_ctl.checks import FAIL, OK
    from kata_vfio_ctl.doctor import check_engines
    from kata_vfio_host.settings import Settings

    def doctor(node: CrioNode) -> dict[str, Any]:
        return {
            c.name: c
            for c in check_engines(
                node.root, node.root / "no-podman.conf", None, Settings(), "3.30"
            )
        }

    for node in _node(tmp_path_factory.mktemp("crio-late")):
        node.load_images()
        node.start()
        assert node.register().returncode == 0
        checks = doctor(node)
        assert checks["cri-o"].status == OK  # the files say registered ...
        running = checks["cri-o:running"]  # ... the running CRI-O does not know it
        assert running.status == FAIL and "has not loaded kata-vfio" in running.detail
        assert running.fix == "restart CRI-O (systemctl restart crio)"
        config = node.top / "late-pod.json"
        config.write_text(json.dumps(node.pod_config("late")))
        refused = node.crictl_run("runp", "--runtime", HANDLER, str(config))
        assert refused.returncode != 0 and HANDLER in refused.stderr, refused.stderr
        node.stop()
        node.start()
        assert doctor(node)["cri-o:running"].status == OK
