"""Vendor and device names from pci.ids (Debian's pci.ids package)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from kata_vfio.pci import hex_number

PCI_IDS = (Path("/usr/share/misc/pci.ids"), Path("/usr/share/hwdata/pci.ids"))


def _hex_id(text: str) -> int | None:
    return hex_number(text.strip().lower(), 4)


def _pci_ids_text() -> str:
    """The first pci.ids there is, or "" (no names: the listing goes on without them)."""
    path = next((p for p in PCI_IDS if p.exists()), None)
    try:
        return path.read_text(encoding="utf-8", errors="replace") if path else ""
    except OSError:
        return ""


@cache
def _table() -> dict[tuple[int, int | None], str]:
    """(vendor, None) and (vendor, device) -> name; lines that do not parse are skipped
    (a damaged or locally edited pci.ids costs names, never the listing)."""
    names: dict[tuple[int, int | None], str] = {}
    text = _pci_ids_text()
    vendor = None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("C "):
            break  # the device-class section follows the vendors
        if not line.startswith("\t"):
            vendor = _hex_id(line[:4])
            if vendor is not None:
                names[(vendor, None)] = line[4:].strip()
        elif not line.startswith("\t\t") and vendor is not None:
            device = _hex_id(line[1:5])
            if device is not None:
                names[(vendor, device)] = line[5:].strip()
    return names


def device_name(vendor: int, device: int) -> str:
    table = _table()
    v = table.get((vendor, None), f"vendor {vendor:04x}")
    d = table.get((vendor, device), f"device {device:04x}")
    return f"{v} {d}"


@cache
def _class_table() -> dict[tuple[int, int | None], str]:
    """(class, None) and (class, subclass) -> name, from pci.ids' "C" section (lines
    `C 02  Network controller`, then `\\t00  Ethernet controller`)."""
    names: dict[tuple[int, int | None], str] = {}
    text = _pci_ids_text()
    start = text.find("\nC ")
    if start < 0:
        return names
    cls = None
    for line in text[start + 1 :].splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("C "):
            code = line[2:4]
            cls = hex_number(code.lower(), 2)
            if cls is not None:
                names[(cls, None)] = line[4:].strip()
        elif line.startswith("\t") and not line.startswith("\t\t") and cls is not None:
            code = line[1:3]
            subclass = hex_number(code.lower(), 2)
            if subclass is not None:
                names[(cls, subclass)] = line[3:].strip()
        elif not line.startswith("\t"):
            cls = None  # another section
    return names


def class_name(class_code: int) -> str:
    """The name lspci shows for a 24-bit class code: the subclass's name, else the
    class's, else `Class CCSS` (lspci's own fallback, also without pci.ids)."""
    table = _class_table()
    base, sub = class_code >> 16, (class_code >> 8) & 0xFF
    return table.get((base, sub)) or table.get((base, None)) or f"Class {class_code >> 8:04x}"
