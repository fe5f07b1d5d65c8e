"""A real kubelet (standalone, static pods) on a private containerd's CRI plugin, whose
default runtime is kata-vfio's shim wrapper with runc's shim inside (the stand-in for
Kata's). Host PCI view: `engine_host`'s fake sysfs. What a Kubernetes user observes: the
pod's output, the nodes in its container, who holds a group, the node's allocatable
devices as the kubelet reports them (issue 16's harness; issue 15 defect 1 on a real CRI).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kata_vfio_ctl import plugin_ledger

from k8s.grpcapi import PeerPlugin, allocatable, compiled, pod_devices
from k8s.node import NODE_NAME, KubeletNode
from k8s.plugin import KataPlugin

pytestmark = [pytest.mark.kubelet]
DEVICES = "io.kata-vfio.devices"
MANIFEST = "io.kata-vfio.manifest"
STAT = "/bin/stat -c '%t:%T %n'"


def node_lines(text: str) -> dict[str, str]:
    """`stat -c '%t:%T %n'` output -> path: major:minor (hex)."""
    return {
        m.group(2): m.group(1)
        for m in re.finditer(r"^([0-9a-f]+:[0-9a-f]+) (/dev/\S+)$", text, re.M)
    }


def wait_ready_line(node: KubeletNode, name: str, line: str = "ready") -> str:
    def printed() -> str | None:
        for f in node.log_files(name):
            text = f.read_text(errors="replace")
            if f" {line}\n" in text:
                return "".join(row.split(" ", 3)[-1] + "\n" for row in text.splitlines())
        return None

    return node.wait_for(printed, 120, f"pod {name} to print {line!r}")  # type: ignore[no-any-return]


def wait_pod_gone(node: KubeletNode, name: str) -> None:
    def gone() -> bool:
        sandbox = node.sandbox(name)
        return sandbox is None or sandbox["state"] == "SANDBOX_NOTREADY"

    node.wait_for(gone, 60, f"the kubelet to stop pod {name}")


def test_a_static_pod_runs_on_the_kata_vfio_runtime(kubelet_node: KubeletNode) -> None:
    kubelet_node.write_pod("hello", ["/bin/sh", "-c", "echo hello from $(cat /etc/hostname)"])
    try:
        container = kubelet_node.wait_exited("hello")
        status = kubelet_node.crictl_json("inspect", "-o", "json", container["id"])["status"]
        assert status["exitCode"] == 0
        assert kubelet_node.logs(container["id"]).splitlines()[0].startswith("hello from ")
        # the kubelet's own view of its pods (read-only port)
        names = [p["metadata"]["name"] for p in kubelet_node.kubelet_pods()]
        assert f"hello-{NODE_NAME}" in names
        # the sandbox ran on kata-vfio's runtime: the shim wrapper, registered by
        # kata-vfio-ctl containerd-register, is the default runtime
        sandbox = kubelet_node.sandbox("hello")
        assert sandbox is not None
        info = kubelet_node.crictl_json("inspectp", "-o", "json", sandbox["id"])["info"]
        assert info["runtimeType"] == "io.containerd.kata-vfio.v2"
        assert info["runtimeHandler"] in ("", "kata-vfio")
        # no device asked: the wrapper claims nothing
        assert kubelet_node.claims() == {}
    finally:
        kubelet_node.delete_pod("hello")
        wait_pod_gone(kubelet_node, "hello")


def test_a_pods_device_goes_to_its_container_not_its_sandbox(kubelet_node: KubeletNode) -> None:
    """Issue 15 defect 1 through a real kubelet: the pod annotation reaches the sandbox's
    spec and the container's (containerd's pod_annotations); the sandbox claims nothing and
    gets no manifest or node; the app container gets /dev/vfio/vfio and /dev/vfio/13 and
    the claim; deleting the pod frees group 13 for the next pod."""
    command = ["/bin/sh", "-c", f"{STAT} /dev/vfio/vfio /dev/vfio/13; echo ready; exec sleep 600"]
    kubelet_node.write_pod("vfio1", command, annotations={DEVICES: "0000:04:00.1"})
    try:
        out = wait_ready_line(kubelet_node, "vfio1")
        assert node_lines(out) == {"/dev/vfio/vfio": "a:c4", "/dev/vfio/13": "f3:1"}, out
        container = kubelet_node.container("vfio1")
        sandbox = kubelet_node.sandbox("vfio1")
        assert container is not None and sandbox is not None
        claims = kubelet_node.claims()
        assert {g: c["container"] for g, c in claims.items()} == {"13": container["id"]}
        sandbox_spec = kubelet_node.spec_of(sandbox["id"])
        assert sandbox_spec["annotations"][DEVICES] == "0000:04:00.1"  # it did reach it
        assert MANIFEST not in sandbox_spec["annotations"]
        sandbox_devices = (sandbox_spec.get("linux") or {}).get("devices") or []
        assert not [d for d in sandbox_devices if d["path"].startswith("/dev/vfio")]
        app_spec = kubelet_node.spec_of(container["id"])
        assert MANIFEST in app_spec["annotations"]
        bundle = claims["13"]["bundle"]
        assert bundle and os.path.isdir(bundle)
    finally:
        kubelet_node.delete_pod("vfio1")
    wait_pod_gone(kubelet_node, "vfio1")
    # the kubelet stopped the container and containerd deleted its task: the claim's
    # bundle is gone, so it owns nothing, and the next pod asking gets the group
    kubelet_node.wait_for(lambda: not os.path.isdir(bundle), 30, "the bundle to go")
    kubelet_node.write_pod("vfio2", command, annotations={DEVICES: "0000:04:00.0"})
    try:
        out = wait_ready_line(kubelet_node, "vfio2")
        assert node_lines(out)["/dev/vfio/13"] == "f3:1", out
        second = kubelet_node.container("vfio2")
        assert second is not None
        assert kubelet_node.claims()["13"]["container"] == second["id"]
    finally:
        kubelet_node.delete_pod("vfio2")
        wait_pod_gone(kubelet_node, "vfio2")


def test_a_device_plugin_registers_and_its_devices_reach_a_pod(
    kubelet_node: KubeletNode, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The harness's device-plugin path with a test peer plugin (not kata-vfio's): it
    registers on this kubelet's device-plugins socket, the kubelet lists its devices as
    allocatable (PodResources GetAllocatableResources), a static pod asking for one is
    admitted, Allocate is called and its answer reaches the container."""
    api = compiled(tmp_path_factory.mktemp("grpc"))
    resource = "kata-vfio.test/peer"
    assert resource not in allocatable(api, kubelet_node.pod_resources_sock)
    peer = PeerPlugin(api, kubelet_node.device_plugins, resource, ["peer-0", "peer-1"])
    peer.start()
    try:
        seen = kubelet_node.wait_for(
            lambda: allocatable(api, kubelet_node.pod_resources_sock).get(resource),
            30,
            f"{resource} in the kubelet's allocatable resources",
        )
        assert seen == ["peer-0", "peer-1"]
        kubelet_node.write_pod(
            "peer1",
            ["/bin/sh", "-c", "echo got=$KATA_VFIO_PEER_DEVICES; echo ready; exec sleep 600"],
            limits={resource: "1"},
        )
        try:
            out = wait_ready_line(kubelet_node, "peer1")
            assert len(peer.allocations) == 1 and len(peer.allocations[0]) == 1
            assert f"got={peer.allocations[0][0]}\n" in out
            given = pod_devices(api, kubelet_node.pod_resources_sock)
            assert given[(f"peer1-{NODE_NAME}", "app")] == {resource: peer.allocations[0]}
        finally:
            kubelet_node.delete_pod("peer1")
            wait_pod_gone(kubelet_node, "peer1")
    finally:
        peer.stop()


# -- kata-vfio's own device plugin on this kubelet ----------------------------------------
# engine_host's fake sysfs: two E1000E groups, 12 (0000:03:00.0, /dev/vfio/12 = 243:0) and
# 13 (0000:04:00.0 and .1, 243:1); one resource offers both, one unit per group
NIC = "nic"
UNIT12, UNIT13 = "0000:03:00.0", "0000:04:00.0"
ALLOCATION = "kubernetes-allocation-"


@pytest.fixture(scope="module")
def kata_plugin(kubelet_node: KubeletNode) -> Iterator[KataPlugin]:
    """`kata-vfio-ctl device-plugin` offering kata-vfio.io/nic (select 8086:10d3), the
    kubelet's allocatable list showing both groups."""
    plugin = KataPlugin(kubelet_node, NIC, "8086:10d3", release_grace=2.0)
    plugin.start()
    try:
        plugin.wait_line(f"registered {plugin.resource} with the kubelet")
        wait_allocatable(kubelet_node, plugin, [UNIT12, UNIT13])
        yield plugin
    finally:
        assert plugin.stop() == 0, plugin.log()


def wait_allocatable(node: KubeletNode, plugin: KataPlugin, ids: list[str]) -> None:
    api = compiled()
    node.wait_for(
        lambda: allocatable(api, node.pod_resources_sock).get(plugin.resource) == ids,
        60,
        f"{plugin.resource} {ids} in the kubelet's allocatable resources",
    )


def device_pod(node: KubeletNode, plugin: KataPlugin, name: str, count: int) -> Path:
    command = [
        "/bin/sh",
        "-c",
        f"{STAT} /dev/vfio/*; echo env=${plugin.env_name}; echo ready; exec sleep 600",
    ]
    return node.write_pod(name, command, limits={plugin.resource: str(count)})


def env_line(out: str) -> str:
    return next(line[len("env=") :] for line in out.splitlines() if line.startswith("env="))


def allocations(node: KubeletNode) -> dict[str, frozenset[int]]:
    """The plugin's allocations as the ledger and its records hold them: id -> groups."""
    return {a.id: a.groups for a in plugin_ledger.allocations(node.ledger()).values()}


def stop_pod(node: KubeletNode, name: str) -> None:
    node.delete_pod(name)
    wait_pod_gone(node, name)


def test_our_plugin_registers_and_a_pod_gets_a_whole_group(
    kubelet_node: KubeletNode, kata_plugin: KataPlugin
) -> None:
    """kata-vfio's plugin on the real kubelet: registered, the kubelet lists one device per
    group as allocatable (the fixture waits for it), a static pod asking for one is
    admitted and its container sees /dev/vfio/vfio and its group's node with the host's
    major:minor and PCIDEVICE_KATA_VFIO_IO_NIC; the container's create took the ledger's
    claim over from the allocation."""
    node = kubelet_node
    device_pod(node, kata_plugin, "dp1", 1)
    try:
        out = wait_ready_line(node, "dp1")
        assert node_lines(out) == {"/dev/vfio/vfio": "a:c4", "/dev/vfio/12": "f3:0"}, out
        assert env_line(out) == UNIT12
        container = node.container("dp1")
        assert container is not None
        assert node.holders() == {12: container["id"]}
        assert allocations(node) == {ALLOCATION + "0000-03-00.0": {12}}
        given = pod_devices(compiled(), node.pod_resources_sock)
        assert given[(f"dp1-{NODE_NAME}", "app")] == {kata_plugin.resource: [UNIT12]}
    finally:
        stop_pod(node, "dp1")


def pod_status(node: KubeletNode, name: str) -> dict[str, Any]:
    for pod in node.kubelet_pods():
        if pod["metadata"]["name"] == f"{name}-{NODE_NAME}":
            return pod.get("status") or {}
    return {}


def test_a_pod_asking_for_more_than_is_free_is_refused_and_nothing_is_claimed(
    kubelet_node: KubeletNode, kata_plugin: KataPlugin
) -> None:
    """With one of the two groups in use, a pod asking for two is refused by the kubelet's
    admission (UnexpectedAdmissionError in its status, no sandbox made); the ledger holds
    only the running pod's claim and no allocation was made for the refused one."""
    node = kubelet_node
    device_pod(node, kata_plugin, "dp2", 1)
    try:
        wait_ready_line(node, "dp2")
        first = node.container("dp2")
        assert first is not None
        before = allocations(node)
        device_pod(node, kata_plugin, "big", 2)
        try:
            status = node.wait_for(
                lambda: pod_status(node, "big").get("reason"),
                60,
                "the kubelet's verdict on pod big",
            )
            assert status == "UnexpectedAdmissionError"
            message = pod_status(node, "big")["message"]
            assert kata_plugin.resource in message and "Requested: 2" in message, message
            assert pod_status(node, "big")["phase"] == "Failed"
            assert node.sandbox("big") is None
            assert node.holders() == {12: first["id"]}
            assert allocations(node) == before
        finally:
            node.delete_pod("big")
    finally:
        stop_pod(node, "dp2")


def test_deleting_the_pod_frees_its_group_for_the_next_pod(
    kubelet_node: KubeletNode, kata_plugin: KataPlugin
) -> None:
    """Removing the static manifest stops the pod; once no container holds the group, the
    grace period (--release-grace 2) has passed and the kubelet's PodResources no longer
    lists the device, the plugin releases the allocation (its log says so, the ledger
    holds nothing of it) and the next pod asking gets the same group."""
    node = kubelet_node
    device_pod(node, kata_plugin, "dp3", 1)
    try:
        wait_ready_line(node, "dp3")
        assert allocations(node) == {ALLOCATION + "0000-03-00.0": {12}}
    finally:
        stop_pod(node, "dp3")
    released = f"released {ALLOCATION}0000-03-00.0 (its pod is gone): groups 12"
    done = kata_plugin.lines(released)
    kata_plugin.wait_line(released, done + 1, timeout=60)
    assert allocations(node) == {}
    assert node.holders() == {}
    device_pod(node, kata_plugin, "dp3b", 1)
    try:
        out = wait_ready_line(node, "dp3b")
        assert node_lines(out)["/dev/vfio/12"] == "f3:0", out
        second = node.container("dp3b")
        assert second is not None
        assert node.holders() == {12: second["id"]}
    finally:
        stop_pod(node, "dp3b")


def pod_devices_of(node: KubeletNode, name: str) -> dict[str, list[str]]:
    """The pod's devices as the kubelet's PodResources lists them; a kubelet that just
    restarted lists its pods again within a few seconds."""

    def listed() -> dict[str, list[str]] | None:
        return pod_devices(compiled(), node.pod_resources_sock).get(  # type: ignore[no-any-return]
            (f"{name}-{NODE_NAME}", "app")
        )

    return node.wait_for(listed, 30, f"pod {name} in the kubelet's PodResources")  # type: ignore[no-any-return]


def kubelet_sock(node: KubeletNode) -> tuple[int, int]:
    st = (node.device_plugins / "kubelet.sock").stat()
    return st.st_ino, st.st_ctime_ns


def new_kubelet_sock(node: KubeletNode, before: tuple[int, int]) -> bool:
    try:
        return kubelet_sock(node) != before
    except FileNotFoundError:
        return False


def test_restarting_the_plugin_then_the_kubelet_keeps_every_allocation(
    kubelet_node: KubeletNode, kata_plugin: KataPlugin
) -> None:
    """A pod holds group 12. The plugin restarts (SIGTERM, exit 0, started again): it
    recovers the allocation from the ledger and registers again. Then the kubelet
    restarts: kubelet.sock is made anew, the plugin registers on it, the allocatable list
    is both groups again, the running pod keeps its container and its claim, and the next
    pod gets the other group, never 12 twice."""
    node = kubelet_node
    device_pod(node, kata_plugin, "dp4", 1)
    try:
        wait_ready_line(node, "dp4")
        running = node.container("dp4")
        assert running is not None
        holders = {12: running["id"]}
        assert node.holders() == holders
        registered = f"registered {kata_plugin.resource} with the kubelet"
        times = kata_plugin.lines(registered)
        assert kata_plugin.stop() == 0, kata_plugin.log()
        kata_plugin.start()
        kata_plugin.wait_line(registered, times + 1)
        assert (
            f"recovered 1 allocations from the ledger: {ALLOCATION}0000-03-00.0"
            in kata_plugin.log()
        )
        wait_allocatable(node, kata_plugin, [UNIT12, UNIT13])
        assert node.holders() == holders
        assert allocations(node) == {ALLOCATION + "0000-03-00.0": {12}}

        before = kubelet_sock(node)
        node.stop_kubelet()
        node.start_kubelet()
        kata_plugin.wait_line(registered, times + 2)
        assert kubelet_sock(node) != before
        wait_allocatable(node, kata_plugin, [UNIT12, UNIT13])
        assert pod_devices_of(node, "dp4") == {kata_plugin.resource: [UNIT12]}
        now = node.container("dp4")
        assert now is not None and now["id"] == running["id"]
        assert now["state"] == "CONTAINER_RUNNING"
        assert node.holders() == holders

        device_pod(node, kata_plugin, "dp4b", 1)
        try:
            out = wait_ready_line(node, "dp4b")
            assert node_lines(out) == {"/dev/vfio/vfio": "a:c4", "/dev/vfio/13": "f3:1"}, out
            assert env_line(out) == "0000:04:00.0,0000:04:00.1"
            other = node.container("dp4b")
            assert other is not None
            assert node.holders() == {12: running["id"], 13: other["id"]}
        finally:
            stop_pod(node, "dp4b")
    finally:
        stop_pod(node, "dp4")


def test_a_pod_made_while_the_last_one_stops_gets_its_group(
    kubelet_node: KubeletNode, kata_plugin: KataPlugin
) -> None:
    """The manifest of a pod holding group 12 removed and at once a new pod asking for
    both groups written: the kubelet hands group 12's device out again while the old
    container is still being stopped; the new pod starts with both groups."""
    node = kubelet_node
    device_pod(node, kata_plugin, "dp5", 1)
    try:
        wait_ready_line(node, "dp5")
    finally:
        node.delete_pod("dp5")
    device_pod(node, kata_plugin, "dp5b", 2)
    try:
        out = wait_ready_line(node, "dp5b")
        assert node_lines(out) == {
            "/dev/vfio/vfio": "a:c4",
            "/dev/vfio/12": "f3:0",
            "/dev/vfio/13": "f3:1",
        }, out
        second = node.container("dp5b")
        assert second is not None
        assert node.holders() == {12: second["id"], 13: second["id"]}
    finally:
        stop_pod(node, "dp5b")
        wait_pod_gone(node, "dp5")


def test_the_kubelet_restarting_while_the_plugin_is_down_keeps_every_claim(
    kubelet_node: KubeletNode, kata_plugin: KataPlugin
) -> None:
    """A pod holds group 12. The plugin stops (SIGTERM, exit 0); the kubelet restarts
    while no plugin serves kata-vfio.io/nic (its socket made anew, the device checkpoint
    its only memory of the pod's device), and refuses a pod asking for one meanwhile;
    then the plugin starts: it recovers the
    allocation from the ledger and registers on the new socket, the allocatable list is
    both groups again, the running pod keeps its container, its device and its claim,
    and the next pod gets the free group 13."""
    node = kubelet_node
    device_pod(node, kata_plugin, "dp6", 1)
    try:
        wait_ready_line(node, "dp6")
        running = node.container("dp6")
        assert running is not None
        assert node.holders() == {12: running["id"]}
        registered = f"registered {kata_plugin.resource} with the kubelet"
        times = kata_plugin.lines(registered)
        assert kata_plugin.stop() == 0, kata_plugin.log()
        before = kubelet_sock(node)
        node.stop_kubelet()
        node.start_kubelet()
        # healthy can come before the device manager has made its socket anew
        node.wait_for(lambda: new_kubelet_sock(node, before), 30, "a new kubelet.sock")
        assert node.holders() == {12: running["id"]}
        # no plugin serves the resource now: a pod asking for it is refused, none claimed
        device_pod(node, kata_plugin, "dp6c", 1)
        try:
            status = node.wait_for(
                lambda: pod_status(node, "dp6c").get("reason"),
                60,
                "the kubelet's verdict on pod dp6c",
            )
            assert status == "UnexpectedAdmissionError", pod_status(node, "dp6c")
            assert node.sandbox("dp6c") is None
            assert node.holders() == {12: running["id"]}
        finally:
            node.delete_pod("dp6c")
        kata_plugin.start()
        kata_plugin.wait_line(registered, times + 1)
        assert (
            f"recovered 1 allocations from the ledger: {ALLOCATION}0000-03-00.0"
            in kata_plugin.log()
        )
        wait_allocatable(node, kata_plugin, [UNIT12, UNIT13])
        assert pod_devices_of(node, "dp6") == {kata_plugin.resource: [UNIT12]}
        now = node.container("dp6")
        assert now is not None and now["id"] == running["id"]
        assert now["state"] == "CONTAINER_RUNNING"
        assert node.holders() == {12: running["id"]}
        assert allocations(node) == {ALLOCATION + "0000-03-00.0": {12}}

        device_pod(node, kata_plugin, "dp6b", 1)
        try:
            out = wait_ready_line(node, "dp6b")
            assert node_lines(out) == {"/dev/vfio/vfio": "a:c4", "/dev/vfio/13": "f3:1"}, out
            assert env_line(out) == "0000:04:00.0,0000:04:00.1"
            other = node.container("dp6b")
            assert other is not None
            assert node.holders() == {12: running["id"], 13: other["id"]}
            # the recovered allocation of the running pod was not released meanwhile
            assert allocations(node) == {
                ALLOCATION + "0000-03-00.0": {12},
                ALLOCATION + "0000-04-00.0": {13},
            }
        finally:
            stop_pod(node, "dp6b")
    finally:
        stop_pod(node, "dp6")
