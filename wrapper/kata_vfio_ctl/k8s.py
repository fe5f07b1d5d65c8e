"""`kata-vfio-ctl runtimeclass`: the Kubernetes side of a node registered with containerd
or CRI-O: a RuntimeClass whose handler is the engine's `kata-vfio` runtime, and a sample
Pod that asks for a device by PCI address.

The pod annotation `io.kata-vfio.devices` reaches the shim wrapper because containerd's
runtime passes `io.kata-vfio.*` pod annotations (`pod_annotations`) and CRI-O's lists it in
`allowed_annotations` (see engines.py). Printed as YAML for `kubectl apply -f -` (a string
that could read as anything else is double-quoted, which YAML reads like JSON), or as a
JSON List.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from kata_vfio.errors import UsageError
from kata_vfio.manifest import DEVICES_ANNOTATION
from kata_vfio.pci import PciAddress

RUNTIME_CLASS = "kata-vfio"
SAMPLE_DEVICE = "0000:03:00.0"
_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9_./-]*")
# words YAML 1.1 reads as booleans or null; anything else that is not _PLAIN (numbers,
# quantities like 250m, PCI addresses, which YAML 1.1 would take for base-60 numbers)
# is double-quoted
_YAML_WORDS = frozenset(["y", "n", "yes", "no", "true", "false", "on", "off", "null"])


def runtime_class(name: str, handler: str, cpu: str | None, memory: str | None
                  ) -> dict[str, Any]:
    rc: dict[str, Any] = {"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
                          "metadata": {"name": name}, "handler": handler}
    pod_fixed = {k: v for k, v in (("cpu", cpu), ("memory", memory)) if v}
    if pod_fixed:
        # what the VM costs beyond the containers' own requests (scheduling and quotas)
        rc["overhead"] = {"podFixed": pod_fixed}
    return rc


def sample_pod(runtime_class_name: str, addresses: list[PciAddress], image: str
               ) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "kata-vfio-sample",
            "annotations": {DEVICES_ANNOTATION: ",".join(str(a) for a in addresses)},
        },
        "spec": {
            "runtimeClassName": runtime_class_name,
            "restartPolicy": "Never",
            "containers": [{
                "name": "app",
                "image": image,
                "command": ["sh", "-c", "ls -l /dev/vfio && sleep 3600"],
                # userspace drivers pin the memory they hand to the device for DMA
                "securityContext": {"capabilities": {"add": ["IPC_LOCK"]}},
            }],
        },
    }


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _YAML_WORDS:
        return text
    return json.dumps(text)


def _is_flow(value: Any) -> bool:
    return not isinstance(value, dict) and not (
        isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value))


def _flow(value: Any) -> str:
    return "[" + ", ".join(_scalar(v) for v in value) + "]" if isinstance(value, list) \
        else _scalar(value)


def to_yaml(value: Any, indent: int = 0) -> list[str]:
    """Block YAML for dicts, lists of dicts and scalars: just what these manifests use."""
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            name = _scalar(key)
            if _is_flow(item):
                lines.append(f"{pad}{name}: {_flow(item)}")
            else:
                lines.append(f"{pad}{name}:")
                lines += to_yaml(item, indent + 2)
    elif isinstance(value, list):
        for item in value:
            block = to_yaml(item, indent + 2)
            lines.append(f"{pad}- {block[0].lstrip()}")
            lines += block[1:]
    else:
        lines.append(f"{pad}{_flow(value)}")
    return lines


def cmd_runtimeclass(args: argparse.Namespace) -> int:
    addresses = [PciAddress.parse(a) for a in args.device or [SAMPLE_DEVICE]]
    if not args.handler:
        raise UsageError("the handler must not be empty",
                         "it is the runtime name in containerd's or CRI-O's configuration")
    objects = [runtime_class(args.name, args.handler, args.overhead_cpu, args.overhead_memory)]
    if not args.no_pod:
        objects.append(sample_pod(args.name, addresses, args.image))
    if args.json:
        print(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}, indent=2))
    else:
        print("\n---\n".join("\n".join(to_yaml(obj)) for obj in objects))
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("runtimeclass",
                       help="print a Kubernetes RuntimeClass for kata-vfio and a sample Pod")
    p.add_argument("--name", default=RUNTIME_CLASS, help="RuntimeClass name")
    p.add_argument("--handler", default=RUNTIME_CLASS,
                   help="the engine's runtime name (containerd/CRI-O registration)")
    p.add_argument("--overhead-cpu", metavar="QUANTITY", help="overhead.podFixed.cpu, e.g. 250m")
    p.add_argument("--overhead-memory", metavar="QUANTITY",
                   help="overhead.podFixed.memory, e.g. 160Mi")
    p.add_argument("--device", action="append", metavar="ADDRESS",
                   help=f"PCI address for the sample Pod (repeatable; default {SAMPLE_DEVICE})")
    p.add_argument("--image", default="busybox", help="the sample Pod's image")
    p.add_argument("--no-pod", action="store_true", help="only the RuntimeClass")
    p.add_argument("--json", action="store_true", help="a JSON List instead of YAML")
    p.set_defaults(func=cmd_runtimeclass)
