"""A real kubelet (standalone, static pods) on a private containerd's CRI plugin, whose
default runtime is kata-vfio's shim wrapper with runc's shim inside (the stand-in for
Kata's). Host PCI view: `engine_host`'s fake sysfs. What a Kubernetes user observes: the
pod's output, the nodes in its container, who holds a group, the node's allocatable
devices as the kubelet reports them (issue 16's harness; issue 15 defect 1 on a real CRI).
"""

from __future__ import annotations

import os
import re

import pytest

from k8s.grpcapi import PeerPlugin, allocatable, compiled, pod_devices
from k8s.node import NODE_NAME, KubeletNode

pytestmark = [pytest.mark.kubelet]
DEVICES = "io.kata-vfio.devices"
MANIFEST = "io.kata-vfio.manifest"
STAT = "/bin/stat -c '%t:%T %n'"


def node_lines(text: str) -> dict[str, str]:
    """`stat -c '%t:%T %n'` output -> path: major:minor (hex)."""
    return {m.group(2): m.group(1)
            for m in re.finditer(r"^([0-9a-f]+:[0-9a-f]+) (/dev/\S+)$", text, re.M)}


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


def test_a_pods_device_goes_to_its_container_not_its_sandbox(
        kubelet_node: KubeletNode) -> None:
    """Issue 15 defect 1 through a real kubelet: the pod annotation reaches the sandbox's
    spec and the container's (containerd's pod_annotations); the sandbox claims nothing and
    gets no manifest or node; the app container gets /dev/vfio/vfio and /dev/vfio/13 and
    the claim; deleting the pod frees group 13 for the next pod."""
    command = ["/bin/sh", "-c", f"{STAT} /dev/vfio/vfio /dev/vfio/13; echo ready; "
               "exec sleep 600"]
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
        kubelet_node: KubeletNode, tmp_path_factory: pytest.TempPathFactory) -> None:
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
            lambda: allocatable(api, kubelet_node.pod_resources_sock).get(resource), 30,
            f"{resource} in the kubelet's allocatable resources")
        assert seen == ["peer-0", "peer-1"]
        kubelet_node.write_pod("peer1", ["/bin/sh", "-c", "echo got=$KATA_VFIO_PEER_DEVICES; "
                                         "echo ready; exec sleep 600"],
                               limits={resource: "1"})
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
