"""`kata-vfio-ctl`: host tools (a separate command: `list`, `state` ... are OCI verbs)."""
# (that line is the description --help shows: build_parser passes this module's __doc__)

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kata_vfio_ctl.base import PROG
from kata_vfio_ctl.bind import cmd_bind, cmd_boot, cmd_restore
from kata_vfio_ctl.devices import cmd_devices
from kata_vfio_ctl.hostsetup import (
    cmd_doctor,
    cmd_install,
    cmd_podman_register,
    cmd_podman_unregister,
    cmd_uninstall,
)
from kata_vfio_ctl.vfs import cmd_vfs


def _default_runtime_path() -> str:
    return str(Path(sys.argv[0]).resolve().with_name("kata-vfio"))


def build_parser() -> argparse.ArgumentParser:
    from kata_vfio.version import package_version
    from kata_vfio_ctl.podman_conf import CONTAINERS_CONF

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--debug", action="store_true", help="tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"{PROG} {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("devices", help="list PCI devices with IOMMU groups, drivers, use")
    p.add_argument(
        "addresses",
        nargs="*",
        metavar="DEVICE",
        help="DDDD:BB:SS.F, BB:SS.F, an interface name, or a glob (0000:03:*)",
    )
    p.add_argument(
        "-d",
        dest="ids",
        action="append",
        metavar="VENDOR:DEVICE[:CLASS]",
        help="lspci -d style filter, parts hex or * (repeatable)",
    )
    p.add_argument("--name", metavar="REGEX", help="match the pci.ids name")
    p.add_argument(
        "--free", action="store_true", help="only what an io.kata-vfio.select allocation could take"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("vfs", help="create (or remove) SR-IOV virtual functions for VFIO use")
    p.add_argument("pf", metavar="PF", help="the physical function: address or interface name")
    p.add_argument("count", type=int, metavar="COUNT", help="how many VFs (0 removes them)")
    p.add_argument(
        "--force",
        action="store_true",
        help="remove VFs even when containers own them, processes hold them or "
        "kata-vfio bound them",
    )
    p.add_argument(
        "--persist",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="make this count again at every boot (kata-vfio-ctl boot), or "
        "--no-persist: no longer (default: a persistent count stays so)",
    )
    p.add_argument("--json", action="store_true", help="the result as JSON")
    p.set_defaults(func=cmd_vfs)

    p = sub.add_parser("bind", help="hand devices (with their whole IOMMU group) to vfio-pci")
    p.add_argument(
        "addresses",
        nargs="+",
        metavar="DEVICE",
        help="DDDD:BB:SS.F, BB:SS.F (domain 0000) or a network interface name",
    )
    p.add_argument("--force", action="store_true", help="bind even when the device is in use")
    p.add_argument(
        "--dry-run", action="store_true", help="say what would move to vfio-pci, change nothing"
    )
    p.add_argument(
        "--persist",
        action="store_true",
        help="bind them again at every boot (kata-vfio-boot.service runs "
        "kata-vfio-ctl boot); restore removes that",
    )
    p.add_argument("--timeout", type=float, default=5.0, help="wait for /dev/vfio/N (s)")
    p.add_argument("--json", action="store_true", help="the result as JSON")
    p.set_defaults(func=cmd_bind)

    p = sub.add_parser("restore", help="give devices back to the drivers they had")
    p.add_argument(
        "addresses", nargs="*", metavar="ADDRESS", help="DDDD:BB:SS.F or BB:SS.F (domain 0000)"
    )
    p.add_argument("--all", action="store_true", help="everything kata-vfio bound")
    p.add_argument(
        "--stale",
        action="store_true",
        help="devices of containers that are gone (bundle removed, or an earlier boot)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="also give back devices a live container holds (its claim is dropped; "
        "the device leaves that container's VM)",
    )
    p.add_argument("--json", action="store_true", help="the result as JSON")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("doctor", help="check this host's readiness, say how to fix")
    p.add_argument("--kata-config", help="Kata configuration.toml (default: Kata's search)")
    p.add_argument("--conf", default=str(CONTAINERS_CONF), help="podman containers.conf")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--kata-version",
        metavar="MAJOR.MINOR",
        help="which Kata uses the configuration (default: kata-runtime --version, "
        "else the configuration's keys)",
    )
    p.set_defaults(func=cmd_doctor)

    for name, func, text in (
        ("install", cmd_install, "configure Kata and podman for kata-vfio"),
        ("uninstall", cmd_uninstall, "undo install"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--kata-config", help="Kata configuration.toml (default: Kata's search)")
        p.add_argument("--conf", default=str(CONTAINERS_CONF), help="podman containers.conf")
        if name == "install":
            p.add_argument("--runtime-path", default=_default_runtime_path())
            p.add_argument(
                "--kata-version",
                metavar="MAJOR.MINOR",
                help="which Kata uses the configuration (default: kata-runtime "
                "--version, else the configuration's keys)",
            )
            p.add_argument(
                "--guest-initrd",
                metavar="PATH",
                help="Kata >= 2: boot this initrd (e.g. build/kata-vfio-initrd.img) "
                "in the generated configuration instead of the installed image",
            )
        from kata_vfio_ctl.engines import add_install_options

        add_install_options(p, install=name == "install")
        p.set_defaults(func=func)

    p = sub.add_parser("podman-register", help="register kata-vfio as a podman runtime")
    p.add_argument("--conf", default=str(CONTAINERS_CONF))
    p.add_argument("--runtime-path", default=_default_runtime_path())
    p.set_defaults(func=cmd_podman_register)

    p = sub.add_parser("podman-unregister", help="remove the podman registration")
    p.add_argument("--conf", default=str(CONTAINERS_CONF))
    p.set_defaults(func=cmd_podman_unregister)

    from kata_vfio_ctl import cdi, devplugin, engines, k8s

    engines.add_parsers(sub)  # containerd-register/-unregister, crio-register/-unregister
    k8s.add_parsers(sub)  # k8s, runtimeclass
    cdi.add_parsers(sub)  # cdi
    devplugin.add_parsers(sub)  # device-plugin
    from kata_vfio_ctl import persistent

    persistent.add_parsers(sub).set_defaults(func=cmd_boot)  # boot
    for name, sub_parser in sub.choices.items():
        sub_parser.formatter_class = argparse.RawDescriptionHelpFormatter
        sub_parser.epilog = "examples:\n" + "\n".join(
            f"  {PROG} {line}" for line in EXAMPLES.get(name, ())
        )
    return parser


# shown under each command's --help; tests parse every one of them
EXAMPLES: dict[str, tuple[str, ...]] = {
    "devices": (
        "devices                      # every PCI function, group, driver, owner",
        "devices --free               # what io.kata-vfio.select could take, or why not",
        "devices -d 8086:* -d ::0200  # lspci -d syntax, as io.kata-vfio.select",
        "devices 03:00.0 eth1 --json  # short addresses and interface names",
    ),
    "vfs": (
        "vfs eth1 4                   # four VFs on eth1's PF (left unbound)",
        "vfs 0000:06:00.0 0           # remove them again (and their persistence)",
        "vfs eth1 4 --persist         # and make them again at every boot (boot)",
        "vfs eth1 4 --no-persist      # keep them now, no longer at boot",
    ),
    "bind": (
        "bind 03:00.0                 # the device and its whole IOMMU group",
        "bind eth1 --dry-run          # say what would move, change nothing",
        "bind 0000:06:10.0 0000:06:10.1 --json",
        "bind 03:00.0 --persist        # and again at every boot (kata-vfio-boot.service)",
        "bind 0000:07:00.1 --persist   # a VF: after vfs PF N --persist (made first)",
    ),
    "boot": (
        "boot                         # at boot: persistent binds again, old claims cleared",
        "boot --timeout 30             # PF drivers, VFs and /dev/vfio/N may take time",
    ),
    "restore": (
        "restore 03:00.0              # back to the driver it had",
        "restore --stale              # devices of containers that are gone",
        "restore --all --json",
    ),
    "doctor": ("doctor", "doctor --json --kata-config /etc/kata-containers/configuration.toml"),
    "install": (
        "install",
        "install --containerd --crio",
        "install --kata-config /etc/kata-containers/configuration.toml",
    ),
    "uninstall": ("uninstall", "uninstall --containerd --crio"),
    "podman-register": (
        "podman-register",
        "podman-register --conf /etc/containers/containers.conf",
    ),
    "podman-unregister": ("podman-unregister",),
    "containerd-register": (
        "containerd-register",
        "containerd-register --conf /etc/containerd/config.toml",
    ),
    "containerd-unregister": ("containerd-unregister",),
    "crio-register": ("crio-register", "crio-register --runtime-root /run/kata-vfio/crio"),
    "crio-unregister": ("crio-unregister",),
    "k8s": (
        "k8s --daemonset | kubectl apply -f -",
        "k8s --runtimeclass",
        "k8s --pod --resource nvme",
    ),
    "runtimeclass": (
        "runtimeclass --no-pod | kubectl apply -f -",
        "runtimeclass --device 0000:03:00.0",
    ),
    "cdi": ("cdi                          # /etc/cdi/kata-vfio.json", "cdi --output -"),
    "device-plugin": (
        "device-plugin                # as the DaemonSet runs it",
        "device-plugin --config /etc/kata-vfio/config.toml",
    ),
}
