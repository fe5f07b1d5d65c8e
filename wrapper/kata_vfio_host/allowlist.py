"""The admin's auto-bind allow-list (config.toml ``[autobind] allow``), parsed strictly.

Annotations are untrusted (on CRI runtimes they come from pod specs), so auto-bind
is default-deny and every pattern must say exactly what it allows:

- ``VENDOR:DEVICE``: each part four hex digits or ``*`` (``8086:10d3``, ``15b3:*``);
  an empty part is an error, never a wildcard;
- a PCI address glob with all four parts, ``0000:03:*.*`` or ``0000:03:00.?``;
- ``*`` alone: everything, for a host whose every device is meant for containers.
"""

from __future__ import annotations

import fnmatch
import re
from functools import cache

from kata_vfio.errors import ConfigError
from kata_vfio.pci import PciDevice, hex_number
from kata_vfio.value import Value

_ADDRESS_GLOB = re.compile(
    r"^[0-9a-f*?\[\]-]{1,5}:[0-9a-f*?\[\]-]{1,2}:[0-9a-f*?\[\]-]{1,2}\.[0-7*?\[\]-]$"
)


class AllowRule(Value):
    vendor: str | None = None  # "8086", or None for any
    device: str | None = None
    address_glob: str | None = None

    def matches(self, dev: PciDevice) -> bool:
        if self.address_glob is not None:
            return fnmatch.fnmatchcase(str(dev.address), self.address_glob)
        return self.vendor in (None, f"{dev.vendor:04x}") and self.device in (
            None,
            f"{dev.device:04x}",
        )


def parse_rule(text: str) -> AllowRule:
    p = text.strip().lower()
    if p == "*":
        return AllowRule()
    vendor, colon, device = p.partition(":")
    if colon and all(part == "*" or hex_number(part, 4) is not None for part in (vendor, device)):
        return AllowRule(None if vendor == "*" else vendor, None if device == "*" else device)
    if _ADDRESS_GLOB.match(p):
        return AllowRule(address_glob=p)
    raise ConfigError(
        f"[autobind] allow: {text!r} is neither VENDOR:DEVICE nor a PCI address glob",
        'write e.g. "8086:10d3", "15b3:*" or "0000:03:*.*"; empty parts are not wildcards',
    )


@cache
def parse_allow_list(patterns: tuple[str, ...]) -> tuple[AllowRule, ...]:
    return tuple(parse_rule(p) for p in patterns)
