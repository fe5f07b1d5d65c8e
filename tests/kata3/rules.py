"""What a Kata >= 2 runtime makes of a container spec and its configuration, as a model of
the rules Kata documents and that were measured against Kata 3.30 (../shared/LAB.md section
6, ../shared/FACTS.md "Kata Containers"). Written by us from those rules, independent of
kata_vfio_ctl.kata3: the tests run the product's generated files and edited specs through it.

Kata's Go runtime is in no registry this project can use (the Go module proxy refuses it),
so `make test` cannot ask Kata's own loader; `make test-kata` does, against an installed
Kata (tests/e2e/test_kata3_real.py).

The rules:
- `io.katacontainers.config_path` picks the configuration file (not gated);
- a hypervisor annotation (`io.katacontainers.config.hypervisor.<key>`) is refused
  ("annotation <name> is not enabled") unless one entry of the configuration's
  `enable_annotations` matches <key> as an unanchored regular expression (Go's
  regexp.MatchString); an enabled one overrides the file's value;
- `io.katacontainers.config.runtime.vfio_mode` is not gated: guest-kernel or vfio;
- with a VFIO device (`/dev/vfio/<N>` in linux.devices): from 3.2 on, `hot_plug_vfio` or
  `cold_plug_vfio` must name a port (bridge-port, root-port, switch-port), else the hot-plug
  fails ("Incorrect hot plug configuration no-port"); root and switch ports need q35;
  before 3.2 the device lands behind a bridge unless `hotplug_vfio_on_root_bus` with
  `pcie_root_port` > 0, where every device shares one guest IOMMU group (kata#2899);
- `vfio_mode = "vfio"` needs a guest IOMMU (`enable_iommu`); in `guest-kernel` mode the
  runtime strips /dev/vfio/* from the spec, so the nodes come from a guest hook
  (`guest_hook_path`, which needs a guest IOMMU too: vfio-pci binds only in an IOMMU group).
Each problem says who would refuse: "kata" (Kata itself) or "path" (Kata runs the
container, but it gets no usable /dev/vfio).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_PATH = "io.katacontainers.config_path"
HYPERVISOR = "io.katacontainers.config.hypervisor."
VFIO_MODE = "io.katacontainers.config.runtime.vfio_mode"
PORTS = ("bridge-port", "root-port", "switch-port")
PLUG_VALUES = ("no-port", *PORTS)
MODES = ("guest-kernel", "vfio")
BOOLS = {"true": True, "false": False}


@dataclass
class Sandbox:
    """The outcome: the configuration used, the effective values, and the problems."""

    config: Path
    hypervisor: dict[str, Any]
    vfio_mode: str
    vfio_devices: list[str]
    problems: list[tuple[str, str]] = field(default_factory=list)

    def refusals(self, who: str | None = None) -> list[str]:
        return [text for by, text in self.problems if who is None or by == who]


def _value(key: str, text: str, current: object) -> object:
    """An annotation's string as the type of the configuration key it overrides."""
    if isinstance(current, bool) or text in BOOLS:
        if text not in BOOLS:
            raise ValueError(f"{key}: {text!r} is not a boolean")
        return BOOLS[text]
    if isinstance(current, int):
        return int(text, 10)
    return text


def sandbox(spec: dict[str, Any], default_config: Path, *, release: tuple[int, int]) -> Sandbox:
    annotations: dict[str, str] = dict(spec.get("annotations") or {})
    config = Path(annotations.get(CONFIG_PATH) or default_config)
    doc = tomllib.loads(config.read_text())
    hv: dict[str, Any] = dict(doc.get("hypervisor", {}).get("qemu", {}))
    mode = str(doc.get("runtime", {}).get("vfio_mode", "guest-kernel"))
    devices = [d.get("path", "") for d in (spec.get("linux") or {}).get("devices") or []]
    vfio = [p for p in devices if re.fullmatch(r"/dev/vfio/[0-9]+", p)]
    out = Sandbox(config, hv, mode, vfio)

    enabled = [str(p) for p in hv.get("enable_annotations", [])]
    for name, text in sorted(annotations.items()):
        if name.startswith(HYPERVISOR):
            key = name[len(HYPERVISOR) :]
            if not any(re.search(pattern, key) for pattern in enabled):
                out.problems.append(("kata", f"annotation {name} is not enabled"))
                continue
            try:
                hv[key] = _value(name, text, hv.get(key))
            except ValueError as exc:
                out.problems.append(("kata", str(exc)))
        elif name == VFIO_MODE:
            out.vfio_mode = text
    if out.vfio_mode not in MODES:
        out.problems.append(("kata", f"vfio_mode {out.vfio_mode!r} is not one of {MODES}"))
    if not vfio:
        return out

    iommu = hv.get("enable_iommu") is True
    if release >= (3, 2):
        hot, cold = hv.get("hot_plug_vfio", "no-port"), hv.get("cold_plug_vfio", "no-port")
        for key, value in (("hot_plug_vfio", hot), ("cold_plug_vfio", cold)):
            if value not in PLUG_VALUES:
                out.problems.append(("kata", f"{key} {value!r} is not one of {PLUG_VALUES}"))
        port = hot if hot in PORTS else cold if cold in PORTS else None
        if port is None:
            out.problems.append(("kata", "Incorrect hot plug configuration no-port"))
        elif port in ("root-port", "switch-port") and hv.get("machine_type") != "q35":
            out.problems.append(("kata", f"{port} needs machine_type q35"))
        elif port == "root-port" and hot == "root-port" and int(hv.get("pcie_root_port", 0)) < 1:
            out.problems.append(("kata", "root-port hot-plug with pcie_root_port = 0"))
    elif not (hv.get("hotplug_vfio_on_root_bus") is True and int(hv.get("pcie_root_port", 0)) > 0):
        out.problems.append(
            (
                "path",
                "devices hot-plugged behind a bridge share one guest "
                "IOMMU group (hotplug_vfio_on_root_bus, pcie_root_port)",
            )
        )
    if out.vfio_mode == "vfio" and not iommu:
        out.problems.append(("kata", 'vfio_mode "vfio" without enable_iommu: no guest groups'))
    if out.vfio_mode == "guest-kernel":
        if not hv.get("guest_hook_path"):
            out.problems.append(
                (
                    "path",
                    "guest-kernel mode strips /dev/vfio and no guest "
                    "hook is configured: the container gets no nodes",
                )
            )
        if not iommu:
            out.problems.append(
                ("path", "no guest IOMMU (enable_iommu): the hook cannot bind vfio-pci")
            )
    return out
