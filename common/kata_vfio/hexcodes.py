"""Hex numbers and MAC addresses, read the one strict way every reader shares: PCI
addresses, vendor/device/class IDs (devices -d, io.kata-vfio.select, the persistent-bind
file, pci.ids, the manifest), the ledger's keys, MACs (the manifest, io.kata-vfio.vf-config).

Lower-case digits only, an exact width, nothing else: `int(text, 16)` alone would also take
`0x`, a sign, `_` between digits and surrounding white space. Callers that accept upper
case from an operator lower-case the text first. Standard library only (the hook reads
manifests with it).
"""

from __future__ import annotations

HEX_DIGITS = frozenset("0123456789abcdef")


def hex_number(text: str, *widths: int) -> int | None:
    """`text` as a number when it is exactly one of `widths` lower-case hex digits, else None."""
    if text and len(text) in widths and set(text) <= HEX_DIGITS:
        return int(text, 16)
    return None


def parse_mac(text: object) -> str | None:
    """A MAC address (six `:`-separated octets of two hex digits, either case), lower-cased;
    None when `text` is not one."""
    if not isinstance(text, str):
        return None
    mac = text.lower()
    octets = mac.split(":")
    if len(octets) == 6 and all(hex_number(o, 2) is not None for o in octets):
        return mac
    return None
