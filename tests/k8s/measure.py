#!/usr/bin/env python3
"""Static pod start to its first output line through the real kubelet, 0 devices vs 1
(for `make bench`): one private node, pods alternated, medians printed as JSON."""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO / d) for d in ("tests", "common", "wrapper", "hook")]

from fakesys import engine_host  # noqa: E402
from k8s.build import ensure_built  # noqa: E402
from k8s.node import KubeletNode, running_node  # noqa: E402


def pod_gone(node: KubeletNode, name: str) -> bool:
    sandbox = node.sandbox(name)
    return sandbox is None or sandbox["state"] == "SANDBOX_NOTREADY"


def main(rounds: int = 5) -> int:
    bins = ensure_built(install_go=True, log=True)
    venv = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(prefix="kvk-") as d:
        top = Path(d)
        with running_node(top, engine_host(top / "sys"), bins,
                          venv / "containerd-shim-kata-vfio-v2", venv / "kata-vfio-ctl") as node:
            seconds: dict[str, list[float]] = {"0": [], "1": []}
            for i in range(rounds):
                for devices in ("0", "1"):
                    name = f"m{devices}x{i}"
                    ask = {"io.kata-vfio.devices": "0000:03:00.0"} if devices == "1" else {}
                    t, line = node.first_line_seconds(
                        name, ["/bin/sh", "-c", "echo first; exec sleep 600"], annotations=ask)
                    assert line == "first", line
                    seconds[devices].append(t)
                    node.delete_pod(name)
                    node.wait_for(lambda n=name: pod_gone(node, n), 60, f"{name} gone")
            p50 = {k: statistics.median(v) for k, v in seconds.items()}
            print(json.dumps({"seconds": seconds, "p50": p50,
                              "ratio_1_over_0": p50["1"] / p50["0"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5))
