"""Static pod start to its first output line through the real kubelet, 1 kata-vfio device
vs 0 (`make bench`, part "kubelet"; target <= 1.2x).

One private node (tests/k8s: the kubelet and crictl built from the Go module proxy,
Debian's containerd with the kata-vfio shim wrapper in front of runc's shim, the engine
tests' fake sysfs) and kata-vfio's own device plugin (`kata-vfio-ctl device-plugin`,
resource kata-vfio.io/nic). Pods of 0 and of 1 device alternate, so both see the same
machine; each is timed from writing its manifest to its first line in the kubelet's log
file, then removed (and, for 1 device, its allocation released) before the next. Medians.

Where the 1-device pod's extra time goes, from the same runs: the plugin's Allocate
(its log's "allocated" lines), the shim wrapper's create (its log's create record).
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path
from typing import Any

RUNS = 7
KINDS = ("none", "plugin", "annotation")


def bench_kubelet(work: Path, runs: int = RUNS) -> None:
    from kata_vfio_ctl import plugin_ledger

    from fakesys import engine_host
    from k8s.build import ensure_built
    from k8s.node import KubeletNode, running_node
    from k8s.plugin import KataPlugin

    if os.geteuid() != 0:
        print("kubelet pod start: skipped (needs root: containerd, runc, the kubelet)")
        return
    bins = ensure_built(install_go=True, log=True)
    venv = Path(sys.executable).parent
    top = work / "kubelet"
    top.mkdir()

    def gone(node: KubeletNode, name: str) -> bool:
        sandbox = node.sandbox(name)
        return sandbox is None or sandbox["state"] == "SANDBOX_NOTREADY"

    with running_node(
        top,
        engine_host(top / "sys"),
        bins,
        venv / "containerd-shim-kata-vfio-v2",
        venv / "kata-vfio-ctl",
    ) as node:
        plugin = KataPlugin(node, "nic", "8086:10d3", release_grace=0.0)
        plugin.start()
        try:
            plugin.wait_line(f"registered {plugin.resource} with the kubelet")
            seconds: dict[str, list[float]] = {k: [] for k in KINDS}
            command = ["/bin/sh", "-c", "echo first; exec sleep 600"]
            for i in range(runs + 1):  # the first round warms the node's caches: not kept
                for kind in KINDS:
                    name = f"b{kind}{i}"
                    pod: dict[str, Any] = {}
                    if kind == "plugin":
                        pod["limits"] = {plugin.resource: "1"}
                    elif kind == "annotation":
                        pod["annotations"] = {"io.kata-vfio.devices": "0000:03:00.0"}
                    t, line = node.first_line_seconds(name, command, **pod)
                    if line != "first":
                        raise RuntimeError(f"pod {name} printed {line!r}")
                    container = node.container(name)
                    held = node.holders()
                    if kind != "none" and (container is None or held.get(12) != container["id"]):
                        raise RuntimeError(f"pod {name}'s container holds no group: {held}")
                    if i:
                        seconds[kind].append(t)
                    node.delete_pod(name)
                    node.wait_for(lambda n=name: gone(node, n), 60, f"{name} gone")
                    node.wait_for(lambda: not node.holders(), 60, "the claim to end")
                    if kind == "plugin":
                        # released (as the pod's grace would have it), so the next
                        # Allocate takes the usual path, not the hand-over of a stale one
                        node.wait_for(
                            lambda: not plugin_ledger.allocations(node.ledger()),
                            60,
                            "the allocation's release",
                        )
        finally:
            plugin.stop()
    p50 = {k: statistics.median(v) * 1e3 for k, v in seconds.items()}
    print(
        f"kubelet static pod to first line (medians of {runs}): 0 devices "
        f"{p50['none']:.0f} ms; 1 device from the device plugin {p50['plugin']:.0f} ms -> "
        f"{p50['plugin'] / p50['none']:.2f}x (target <= 1.2x); 1 device by the "
        f"io.kata-vfio.devices annotation {p50['annotation']:.0f} ms -> "
        f"{p50['annotation'] / p50['none']:.2f}x"
    )
