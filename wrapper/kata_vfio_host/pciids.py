"""Vendor and device names from pci.ids (Debian's pci.ids package)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

PCI_IDS = (Path("/usr/share/misc/pci.ids"), Path("/usr/share/hwdata/pci.ids"))


@cache
def _table() -> dict[tuple[int, int | None], str]:
    names: dict[tuple[int, int | None], str] = {}
    path = next((p for p in PCI_IDS if p.exists()), None)
    if path is None:
        return names
    vendor = None
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("C "):
            break  # the device-class section follows the vendors
        if not line.startswith("\t"):
            vendor = int(line[:4], 16)
            names[(vendor, None)] = line[4:].strip()
        elif not line.startswith("\t\t") and vendor is not None:
            names[(vendor, int(line[1:5], 16))] = line[5:].strip()
    return names


def device_name(vendor: int, device: int) -> str:
    table = _table()
    v = table.get((vendor, None), f"vendor {vendor:04x}")
    d = table.get((vendor, device), f"device {device:04x}")
    return f"{v} {d}"
