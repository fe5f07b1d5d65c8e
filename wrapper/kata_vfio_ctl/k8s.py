"""`kata-vfio-ctl runtimeclass`: the Kubernetes side of a node registered with containerd
or CRI-O: a RuntimeClass whose handler is the engine's `kata-vfio` runtime, and a sample
Pod that asks for a device by PCI address.

`kata-vfio-ctl k8s` prints one manifest per flag (so `| kubectl apply -f -` applies just
that): `--daemonset`, the device plugin on every node with the node label; `--runtimeclass`,
the RuntimeClass with overhead and that node label as its nodeSelector; `--pod`, a sample Pod
asking for `kata-vfio.io/<name>: 1`.

The pod annotation `io.kata-vfio.devices` reaches the shim wrapper because containerd's
runtime passes `io.kata-vfio.*` pod annotations (`pod_annotations`) and CRI-O's lists it in
`allowed_annotations` (see crio_conf.py). Printed as YAML for `kubectl apply -f -` (a string
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


def runtime_class(name: str, handler: str, cpu: str | None, memory: str | None) -> dict[str, Any]:
    rc: dict[str, Any] = {
        "apiVersion": "node.k8s.io/v1",
        "kind": "RuntimeClass",
        "metadata": {"name": name},
        "handler": handler,
    }
    pod_fixed = {k: v for k, v in (("cpu", cpu), ("memory", memory)) if v}
    if pod_fixed:
        # what the VM costs beyond the containers' own requests (scheduling and quotas)
        rc["overhead"] = {"podFixed": pod_fixed}
    return rc


def sample_pod(runtime_class_name: str, addresses: list[PciAddress], image: str) -> dict[str, Any]:
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
            "containers": [
                {
                    "name": "app",
                    "image": image,
                    "command": ["sh", "-c", "ls -l /dev/vfio && sleep 3600"],
                    # userspace drivers pin the memory they hand to the device for DMA
                    "securityContext": {"capabilities": {"add": ["IPC_LOCK"]}},
                }
            ],
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
        isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value)
    )


def _flow(value: Any) -> str:
    return (
        "[" + ", ".join(_scalar(v) for v in value) + "]"
        if isinstance(value, list)
        else _scalar(value)
    )


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
        raise UsageError(
            "the handler must not be empty",
            "it is the runtime name in containerd's or CRI-O's configuration",
        )
    objects = [runtime_class(args.name, args.handler, args.overhead_cpu, args.overhead_memory)]
    if not args.no_pod:
        objects.append(sample_pod(args.name, addresses, args.image))
    if args.json:
        print(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}, indent=2))
    else:
        print("\n---\n".join("\n".join(to_yaml(obj)) for obj in objects))
    return 0


DAEMONSET = "kata-vfio-device-plugin"
DEFAULT_NODE_LABEL = "kata-vfio.io/node=true"
DEFAULT_IMAGE = "kata-vfio:latest"
# (volume name, host path, hostPath type, read-only): what the plugin reads and keeps
PLUGIN_HOST_PATHS = (
    ("sysfs", "/sys", "Directory", False),  # binds write driver_override, drivers_probe
    ("dev-vfio", "/dev/vfio", "DirectoryOrCreate", False),
    ("device-plugins", "/var/lib/kubelet/device-plugins", "Directory", False),
    ("pod-resources", "/var/lib/kubelet/pod-resources", "DirectoryOrCreate", False),
    ("config", "/etc/kata-vfio", "DirectoryOrCreate", True),
    ("state", "/var/lib/kata-vfio", "DirectoryOrCreate", False),
    ("cdi", "/var/run/cdi", "DirectoryOrCreate", False),
)


def node_label(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if (
        not eq
        or not re.fullmatch(r"([a-z0-9.-]+/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", key)
        or not re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,61}[A-Za-z0-9]?)?", value)
    ):
        raise UsageError(
            f"--node-label {text!r} is not KEY=VALUE", f"e.g. --node-label {DEFAULT_NODE_LABEL}"
        )
    return key, value


def device_plugin_daemonset(image: str, namespace: str, label: tuple[str, str]) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": DAEMONSET}
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": DAEMONSET, "namespace": namespace, "labels": labels},
        "spec": {
            "selector": {"matchLabels": labels},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {label[0]: label[1]},
                    "priorityClassName": "system-node-critical",
                    "tolerations": [{"operator": "Exists"}],
                    # the in-use checks see the host's interfaces and processes (open
                    # /dev/vfio groups)
                    "hostNetwork": True,
                    "hostPID": True,
                    "containers": [
                        {
                            "name": "device-plugin",
                            "image": image,
                            "command": ["kata-vfio-ctl", "device-plugin"],
                            "securityContext": {"privileged": True},
                            "volumeMounts": [
                                {
                                    "name": name,
                                    "mountPath": path,
                                    **({"readOnly": True} if ro else {}),
                                }
                                for name, path, _, ro in PLUGIN_HOST_PATHS
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": name, "hostPath": {"path": path, "type": kind}}
                        for name, path, kind, _ in PLUGIN_HOST_PATHS
                    ],
                },
            },
        },
    }


def resource_pod(runtime_class_name: str, resource: str, image: str) -> dict[str, Any]:
    from kata_vfio_ctl.plugin_devices import DOMAIN, Resource

    env = Resource(resource, None, ()).env_name
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"kata-vfio-{resource}-sample"},
        "spec": {
            "runtimeClassName": runtime_class_name,
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "app",
                    "image": image,
                    "command": ["sh", "-c", f"echo {env}=${env}; ls -l /dev/vfio && sleep 3600"],
                    "resources": {"limits": {f"{DOMAIN}/{resource}": 1}},
                    "securityContext": {"capabilities": {"add": ["IPC_LOCK"]}},
                }
            ],
        },
    }


def cmd_k8s(args: argparse.Namespace) -> int:
    label = node_label(args.node_label)
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", args.resource):
        raise UsageError(
            f"--resource {args.resource!r} is not a resource name",
            "the name of a [[device_plugin.resource]], e.g. nvme",
        )
    if args.daemonset:
        obj = device_plugin_daemonset(args.image, args.namespace, label)
    elif args.runtimeclass:
        obj = runtime_class(args.name, args.handler, args.overhead_cpu, args.overhead_memory)
        obj["scheduling"] = {"nodeSelector": {label[0]: label[1]}}
    else:
        obj = resource_pod(args.name, args.resource, args.pod_image)
    print(json.dumps(obj, indent=2) if args.json else "\n".join(to_yaml(obj)))
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "k8s",
        help="print one Kubernetes manifest: the device plugin's "
        "DaemonSet, the RuntimeClass or a sample Pod",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--daemonset",
        action="store_true",
        help="the device plugin DaemonSet (privileged, host paths)",
    )
    which.add_argument(
        "--runtimeclass",
        action="store_true",
        help="the RuntimeClass (handler, overhead, nodeSelector)",
    )
    which.add_argument(
        "--pod", action="store_true", help="a sample Pod asking for kata-vfio.io/<resource>: 1"
    )
    p.add_argument(
        "--image",
        default=DEFAULT_IMAGE,
        help=f"the DaemonSet's image, with kata-vfio installed ({DEFAULT_IMAGE})",
    )
    p.add_argument("--namespace", default="kube-system", help="the DaemonSet's namespace")
    p.add_argument(
        "--node-label",
        default=DEFAULT_NODE_LABEL,
        metavar="KEY=VALUE",
        help="nodes with kata-vfio (DaemonSet and RuntimeClass nodeSelector; "
        f"default {DEFAULT_NODE_LABEL})",
    )
    p.add_argument("--name", default=RUNTIME_CLASS, help="RuntimeClass name")
    p.add_argument(
        "--handler",
        default=RUNTIME_CLASS,
        help="the engine's runtime name (containerd/CRI-O registration)",
    )
    p.add_argument(
        "--overhead-cpu",
        default="250m",
        metavar="QUANTITY",
        help="overhead.podFixed.cpu (default 250m)",
    )
    p.add_argument(
        "--overhead-memory",
        default="160Mi",
        metavar="QUANTITY",
        help="overhead.podFixed.memory (default 160Mi)",
    )
    p.add_argument(
        "--resource",
        default="nvme",
        help="the sample Pod's [[device_plugin.resource]] name (default nvme)",
    )
    p.add_argument("--pod-image", default="busybox", help="the sample Pod's image")
    p.add_argument("--json", action="store_true", help="JSON instead of YAML")
    p.set_defaults(func=cmd_k8s)

    p = sub.add_parser(
        "runtimeclass", help="print a Kubernetes RuntimeClass for kata-vfio and a sample Pod"
    )
    p.add_argument("--name", default=RUNTIME_CLASS, help="RuntimeClass name")
    p.add_argument(
        "--handler",
        default=RUNTIME_CLASS,
        help="the engine's runtime name (containerd/CRI-O registration)",
    )
    p.add_argument("--overhead-cpu", metavar="QUANTITY", help="overhead.podFixed.cpu, e.g. 250m")
    p.add_argument(
        "--overhead-memory", metavar="QUANTITY", help="overhead.podFixed.memory, e.g. 160Mi"
    )
    p.add_argument(
        "--device",
        action="append",
        metavar="ADDRESS",
        help=f"PCI address for the sample Pod (repeatable; default {SAMPLE_DEVICE})",
    )
    p.add_argument("--image", default="busybox", help="the sample Pod's image")
    p.add_argument("--no-pod", action="store_true", help="only the RuntimeClass")
    p.add_argument("--json", action="store_true", help="a JSON List instead of YAML")
    p.set_defaults(func=cmd_runtimeclass)
