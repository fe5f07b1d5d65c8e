"""What kata-vfio-ctl's host commands share: the command's name, the host it works on
(`_host`, the one place tests hand in a fake host), its event log, device arguments."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from kata_vfio.errors import DeviceError

PROG = "kata-vfio-ctl"
IFNAMSIZ = 16  # the kernel's limit, terminating NUL included


def _event_log(args: argparse.Namespace) -> Any:
    """structlog, JSON lines into config.toml's log_file: what the admin's commands
    changed on the host (the wrappers write the same shape without structlog)."""
    from kata_vfio_host.hostlog import file_logger
    from kata_vfio_host.settings import load_settings

    return file_logger(
        load_settings().log_file,
        warn=sys.stderr,
        journal=sys.stderr,
        tool=PROG,
        command=args.command,
    )


def _host(args: argparse.Namespace) -> Any:
    from kata_vfio_host.ledger import Host
    from kata_vfio_host.settings import load_settings

    settings = load_settings()
    return Host(sysfs=Path(settings.sysfs), state_dir=Path(settings.state_dir))


def valid_interface_name(text: str) -> bool:
    """The kernel's rule for interface names (dev_valid_name): a safe path component."""
    return (
        0 < len(text) < IFNAMSIZ
        and text not in (".", "..")
        and text.isprintable()
        and not any(c in text for c in "/: \t\n")
    )


def function_of_interface(sysfs: Path, ifname: str) -> Any:
    """The PCI function an interface lives on: the nearest PCI address above it in sysfs
    (a virtio NIC's interface sits at <function>/virtio2/net/eth0)."""
    from kata_vfio.errors import KataVfioError
    from kata_vfio.pci import PciAddress, device_dir

    link = Path(sysfs) / "class/net" / ifname
    if not os.path.lexists(link):
        raise DeviceError(
            f"no PCI device or network interface {ifname!r} on this host",
            "give DDDD:BB:SS.F, BB:SS.F or an interface name; "
            "list them with: kata-vfio-ctl devices",
        )
    target = Path(os.path.realpath(link))
    root = Path(os.path.realpath(sysfs))
    below = target.relative_to(root).parts if target.is_relative_to(root) else ()
    for part in reversed(below):
        try:
            addr = PciAddress.parse(part)
        except KataVfioError:
            continue
        if os.path.isdir(device_dir(sysfs, addr)):
            return addr
    raise DeviceError(
        f"interface {ifname} is not on a PCI device ({target})",
        "only PCI functions can be handed to vfio-pci; list them with: kata-vfio-ctl devices",
    )


def device_argument(sysfs: Path, text: str) -> Any:
    """A device as users name it: DDDD:BB:SS.F, BB:SS.F (domain 0000, as lspci prints it)
    or a network interface name. Parsed strictly; never joined to a path unchecked."""
    from kata_vfio.pci import PciAddress

    text = text.strip()
    if text.count(":") == 1:
        return PciAddress.parse("0000:" + text)
    if ":" not in text and valid_interface_name(text):
        return function_of_interface(sysfs, text)
    return PciAddress.parse(text)
