"""Issue 16, CDI through a real kubelet: kata-vfio's device plugin with `cdi = true`
answers Allocate with `cdi_devices` named kata-vfio.io/<name>=<id> from the spec it keeps
in its CDI directory (cdiVersion 0.5.0); the kubelet passes them to containerd 2's CRI
(CRI `CDIDevices`), which resolves them from its CDI spec directories and puts the nodes
and their device cgroup rules in the container. Debian's containerd 1.6 cannot resolve
CDI: this node's containerd is containerd 2, built from Go modules (tests/k8s/build.py
--containerd), its CDI spec directory private (`node.cdi_dir`). Host PCI view:
`engine_host`'s fake sysfs (group 12: 0000:03:00.0 = /dev/vfio/12 243:0)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from k8s.grpcapi import allocatable, compiled
from k8s.node import NODE_NAME, KubeletNode
from k8s.plugin import KataPlugin
from test_kubelet import (
    ALLOCATION,
    NIC,
    UNIT12,
    UNIT13,
    allocations,
    env_line,
    node_lines,
    stop_pod,
    wait_ready_line,
)

pytestmark = [pytest.mark.kubelet]
SPEC = "kata-vfio.io-nic.json"
# each node: its major:minor, then what opening it for reading answered
PROBE = (
    "for n in /dev/vfio/*; do /bin/stat -c '%t:%T %n' $n; "
    'echo "open $n: $(/bin/cat $n 2>&1 </dev/null | tail -n 1)"; done; '
    "echo env=$PCIDEVICE_KATA_VFIO_IO_NIC; echo ready; exec sleep 600"
)


@contextmanager
def cdi_plugin(node: KubeletNode, cdi_dir: Path) -> Iterator[KataPlugin]:
    plugin = KataPlugin(node, NIC, "8086:10d3", release_grace=2.0, cdi_dir=cdi_dir)
    plugin.start()
    try:
        plugin.wait_line(f"registered {plugin.resource} with the kubelet")
        api = compiled()
        node.wait_for(
            lambda: (
                allocatable(api, node.pod_resources_sock).get(plugin.resource) == [UNIT12, UNIT13]
            ),
            60,
            f"{plugin.resource} in the allocatable list",
        )
        yield plugin
    finally:
        assert plugin.stop() == 0, plugin.log()


RELEASED = f"released {ALLOCATION}"


def wait_released(node: KubeletNode, plugin: KataPlugin, before: int) -> None:
    """One more allocation released than `before` (the log is one file for every plugin
    this node ran), none left."""
    plugin.wait_line(RELEASED, before + 1, timeout=60)
    assert allocations(node) == {}


def opened(out: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r"^open (\S+): (.*)$", out, re.M)}


def test_a_cdi_plugins_pod_gets_its_nodes_from_the_cdi_spec(cdi_node: KubeletNode) -> None:
    """The plugin's spec in containerd's CDI directory; a static pod asking for one
    kata-vfio.io/nic starts; the spec containerd gave runc has /dev/vfio/vfio and
    /dev/vfio/12 with the spec's major:minor and an allow rule for each (CDI's edits); in
    the container the nodes have them and opening one gets past the device cgroup to the
    kernel, which has no driver behind the fake host's numbers (no "Operation not
    permitted"); the env variable and the claim are there as without CDI."""
    node = cdi_node
    assert node.cdi_dir is not None
    with cdi_plugin(node, node.cdi_dir) as plugin:
        spec = json.loads((node.cdi_dir / SPEC).read_text())
        assert (spec["cdiVersion"], spec["kind"]) == ("0.5.0", "kata-vfio.io/nic")
        assert {d["name"] for d in spec["devices"]} >= {UNIT12, UNIT13}
        released = plugin.lines(RELEASED)
        node.write_pod("cdi1", ["/bin/sh", "-c", PROBE], limits={plugin.resource: "1"})
        try:
            out = wait_ready_line(node, "cdi1")
            assert node_lines(out) == {"/dev/vfio/vfio": "a:c4", "/dev/vfio/12": "f3:0"}, out
            for path, answer in opened(out).items():
                assert "Operation not permitted" not in answer, out
                assert re.search(r"No such device( or address)?$", answer), (path, out)
            assert env_line(out) == UNIT12
            container = node.container("cdi1")
            assert container is not None
            assert node.holders() == {12: container["id"]}
            linux = node.spec_of(container["id"])["linux"]
            vfio = {
                d["path"]: (d["type"], d["major"], d["minor"])
                for d in linux["devices"]
                if d["path"].startswith("/dev/vfio/")
            }
            assert vfio == {"/dev/vfio/vfio": ("c", 10, 196), "/dev/vfio/12": ("c", 243, 0)}
            rules = {
                (r.get("major"), r.get("minor"))
                for r in linux["resources"]["devices"]
                if r.get("allow") and r.get("type") == "c"
            }
            assert {(10, 196), (243, 0)} <= rules
        finally:
            stop_pod(node, "cdi1")
        wait_released(node, plugin, released)


def pod_waiting(node: KubeletNode, name: str) -> dict[str, Any] | None:
    for pod in node.kubelet_pods():
        if pod["metadata"]["name"] != f"{name}-{NODE_NAME}":
            continue
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (status.get("state") or {}).get("waiting") or {}
            if waiting.get("message"):
                return waiting
    return None


def test_a_cdi_name_containerd_cannot_resolve_stops_the_container(
    cdi_node: KubeletNode, tmp_path: Path
) -> None:
    """The proof that containerd resolves the names: a plugin whose --cdi-dir is not one
    containerd reads gives the same Allocate answer, and the container is not created —
    the kubelet reports containerd's 'unresolvable CDI devices kata-vfio.io/nic=<id>', no
    container holds the group; deleting the pod releases the allocation (nothing stays
    claimed)."""
    node = cdi_node
    assert node.cdi_dir is not None
    # a plugin that stops leaves its spec (as other vendors' do): moved away by the admin
    (node.cdi_dir / SPEC).unlink(missing_ok=True)
    elsewhere = tmp_path / "cdi-elsewhere"
    with cdi_plugin(node, elsewhere) as plugin:
        assert (elsewhere / SPEC).is_file()
        assert list(node.cdi_dir.iterdir()) == []
        released = plugin.lines(RELEASED)
        node.write_pod("cdi2", ["/bin/sh", "-c", PROBE], limits={plugin.resource: "1"})
        try:
            waiting = node.wait_for(
                lambda: pod_waiting(node, "cdi2"),
                120,
                "the kubelet to report why cdi2's container waits",
            )
            assert waiting["reason"] == "CreateContainerError", waiting
            assert re.search(
                r"unresolvable CDI devices kata-vfio\.io/nic=0000:0[34]:00\.0", waiting["message"]
            ), waiting
            assert (
                node.container("cdi2") is None
                or node.container("cdi2")["state"] != "CONTAINER_RUNNING"
            )
            # the allocation holds the group, no container took it over
            assert [h for h in node.holders().values() if not h.startswith(ALLOCATION)] == []
        finally:
            stop_pod(node, "cdi2")
        wait_released(node, plugin, released)
