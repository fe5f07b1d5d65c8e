"""`doctor`'s checks of Kata's configuration: Kata 1.x's in-place settings (kata_conf.py
writes them) and, for Kata >= 2, the generated configuration kata3.py derives.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kata_vfio.errors import ConfigError
from kata_vfio_ctl.checks import FAIL, OK, WARN, Check
from kata_vfio_ctl.kata3 import (
    GENERATED_NAME,
    KATA_RUNTIMES,
    NO_PORT,
    PCIE_ROOT_PORTS,
    ROOT_PORT,
    SWITCH_PORT,
    VFIO_MODE_AGENT,
    VFIO_MODE_HOOK,
    KataRelease,
    ReleaseUnknown,
    detect_release,
    generated_from,
    read_toml,
    release_from_keys,
)
from kata_vfio_ctl.kata_conf import HYPERVISOR_ANNOTATION_PREFIX, annotation_enabled
from kata_vfio_host.settings import GUEST_AGENT, Settings

HOOK_IN_IMAGE = "usr/share/oci/hooks/prestart/kata-vfio-hook"


def check_kata(path: Path | None, guest_hook_path: str, annotations: dict[str, str]) -> list[Check]:
    from kata_vfio_ctl.kata_conf import check

    if path is None or not path.exists():
        return [
            Check(
                "kata-config",
                FAIL,
                "no Kata configuration.toml found",
                "install Kata, or pass --kata-config PATH",
            )
        ]
    import tomllib

    from kata_vfio.errors import KataVfioError

    try:
        checks = [
            Check(
                f"kata:{key}",
                OK if ok else FAIL,
                f"{path}",
                "" if ok else f"set {fix} (kata-vfio-ctl install does it)",
            )
            for key, ok, fix in check(path, guest_hook_path, annotations)
        ]
        checks.append(check_kata_initrd(path))
    except (OSError, UnicodeError, tomllib.TOMLDecodeError, KataVfioError) as exc:
        detail = (
            exc.message
            if isinstance(exc, KataVfioError)
            else f"cannot read {path}: {exc.strerror if isinstance(exc, OSError) else exc}"
        )
        return [Check("kata-config", FAIL, detail, "fix the file, or pass --kata-config PATH")]
    return checks


def check_kata_initrd(path: Path) -> Check:
    import tomllib

    from kata_vfio.run import CommandError, run
    from kata_vfio_ctl.kata_conf import hypervisor_table
    from kata_vfio_ctl.textfile import read_text

    _, table = hypervisor_table(tomllib.loads(read_text(path, "Kata configuration")), path)
    initrd = table.get("initrd")
    if not initrd:
        return Check(
            "kata:initrd",
            FAIL,
            "Kata boots an image, not an initrd",
            'build one with `make initrd` and set initrd = "…" in ' + str(path),
        )
    try:
        # the listing (lsinitrd IMG FILE would print the file's contents instead)
        listing = run(["lsinitrd", str(initrd)], what=f"listing {initrd}", timeout=120)
    except CommandError as err:
        return Check("kata:initrd", FAIL, f"cannot look inside {initrd}: {err.message}", err.hint)
    if any(
        line.split()[-1:] == [HOOK_IN_IMAGE] and line.startswith("-rwx")
        for line in listing.stdout.splitlines()
    ):
        return Check("kata:initrd", OK, f"{initrd} has the kata-vfio hook")
    return Check(
        "kata:initrd",
        FAIL,
        f"{initrd} has no kata-vfio hook",
        "build the guest image with `make initrd` (initrd/90kata-vfio)",
    )


def doctor_checks(
    installed: Path | None,
    settings: Settings,
    *,
    kata_version: str | None = None,
    runtimes: tuple[str, ...] = KATA_RUNTIMES,
) -> list[Check] | None:
    """Kata >= 2 readiness; None when the installed Kata is 1.x (doctor's own checks apply)."""
    if installed is None or not installed.exists():
        if not settings.kata_config_path:
            return None
        return [
            Check(
                "kata-config",
                WARN,
                "no installed Kata configuration.toml found",
                "pass --kata-config PATH",
            ),
            *check_generated(None, settings, None),
        ]
    try:
        release = detect_release(installed, read_toml(installed), kata_version, runtimes)
    except ReleaseUnknown as err:
        if not settings.kata_config_path:
            return None  # the wrapper adds the 1.x annotation: doctor's 1.x checks apply
        return [
            Check("kata:version", WARN, err.message, err.hint),
            *check_generated(installed, settings, None),
        ]
    except ConfigError as err:
        return [Check("kata:version", FAIL, err.message, err.hint)]
    if release.major < 2:
        if not settings.kata_config_path:
            return None
        return [
            Check(
                "kata:config_path",
                FAIL,
                f"{release}, but kata_config_path is set: VFIO "
                "containers would not get the guest_hook_path annotation",
                "remove kata_config_path from config.toml",
            ),
            *check_kata(installed, settings.guest_hook_path, settings.annotations),
        ]
    return [Check("kata:version", OK, str(release)), *check_generated(installed, settings, release)]


def check_generated(
    installed: Path | None, settings: Settings, release: KataRelease | None
) -> list[Check]:
    if not settings.kata_config_path:
        where = installed.with_name(GENERATED_NAME) if installed else GENERATED_NAME
        return [
            Check(
                "kata:config_path",
                FAIL,
                "kata_config_path is not set in config.toml: VFIO containers would carry "
                "the guest_hook_path annotation, which Kata >= 2 refuses by default",
                f"kata-vfio-ctl install (writes {where} and sets kata_config_path)",
            )
        ]
    path = Path(settings.kata_config_path)
    if not path.is_file():
        return [
            Check(
                "kata:generated",
                FAIL,
                f"{path} (kata_config_path) does not exist",
                "kata-vfio-ctl install",
            )
        ]
    try:
        data = read_toml(path)
    except ConfigError as err:
        return [Check("kata:generated", FAIL, err.message, "kata-vfio-ctl install")]
    checks = [_check_origin(path, installed)]
    release = release or release_from_keys(data) or KataRelease(2, 0, "unknown")
    qemu = (data.get("hypervisor") or {}).get("qemu") or {}
    checks.append(check_iommu(qemu))
    checks.append(check_plug(qemu, release))
    checks.append(check_vfio_mode(data, settings, release))
    checks.append(check_hook_path(qemu, settings))
    checks.append(check_annotations(qemu, settings))
    checks.append(check_image(path, qemu, settings))
    return checks


def _check_origin(path: Path, installed: Path | None) -> Check:
    source = generated_from(path)
    if source is None:
        return Check(
            "kata:generated",
            WARN,
            f"{path} was not generated by kata-vfio-ctl",
            "kata-vfio-ctl install writes and maintains it",
        )
    if installed is not None and source.resolve() != installed.resolve():
        return Check(
            "kata:generated",
            WARN,
            f"{path} was derived from {source}, not {installed}",
            "kata-vfio-ctl install --kata-config " + str(installed),
        )
    try:
        stale = source.stat().st_mtime > path.stat().st_mtime
    except OSError:
        return Check(
            "kata:generated", WARN, f"{path}: its source {source} is gone", "kata-vfio-ctl install"
        )
    if stale:
        return Check(
            "kata:generated",
            WARN,
            f"{source} changed after {path} was generated (a Kata upgrade?)",
            "kata-vfio-ctl install (regenerates it)",
        )
    return Check("kata:generated", OK, f"{path} (from {source})")


def check_iommu(qemu: dict[str, Any]) -> Check:
    machine, iommu = qemu.get("machine_type"), qemu.get("enable_iommu")
    detail = f"machine_type = {machine!r}, enable_iommu = {iommu!r}"
    if machine == "q35" and iommu is True:
        return Check("kata:iommu", OK, detail)
    return Check(
        "kata:iommu",
        FAIL,
        detail,
        'machine_type = "q35" and enable_iommu = true (kata-vfio-ctl install)',
    )


def check_plug(qemu: dict[str, Any], release: KataRelease) -> Check:
    ports = qemu.get("pcie_root_port", 0)
    if release.has_port_plugging:
        hot, cold = qemu.get("hot_plug_vfio", NO_PORT), qemu.get("cold_plug_vfio", NO_PORT)
        switches = qemu.get("pcie_switch_port", 0)
        detail = f"hot_plug_vfio = {hot!r}, cold_plug_vfio = {cold!r}, pcie_root_port = {ports}"
        if SWITCH_PORT in (hot, cold):
            detail += f", pcie_switch_port = {switches}"
        if hot == NO_PORT and cold == NO_PORT:
            return Check(
                "kata:plug",
                FAIL,
                detail + ': Kata refuses VFIO devices ("port is not set for device", kata#9014)',
                'hot_plug_vfio = "root-port" (kata-vfio-ctl install)',
            )
        if NO_PORT not in (hot, cold):
            return Check(
                "kata:plug",
                FAIL,
                detail + ": both set, and Kata takes only one",
                'hot_plug_vfio = "root-port", cold_plug_vfio = "no-port"',
            )
        for port, count, key in (
            (ROOT_PORT, ports, "pcie_root_port"),
            (SWITCH_PORT, switches, "pcie_switch_port"),
        ):
            if port in (hot, cold) and not (isinstance(count, int) and count > 0):
                return Check(
                    "kata:plug",
                    FAIL,
                    detail + f": {port} but {key} = {count}: no port for the device to land on",
                    f"{key} = {PCIE_ROOT_PORTS} (one per device)",
                )
        if cold != NO_PORT:
            return Check(
                "kata:plug",
                WARN,
                detail + ": cold-plug takes only the devices the "
                "pod had when its VM started (kubelet's pod resources); a device "
                'added per container is not found ("No PCI mapping found for '
                'container", kata#11910)',
                'hot_plug_vfio = "root-port", cold_plug_vfio = "no-port"',
            )
        if ROOT_PORT not in (hot, cold) and SWITCH_PORT not in (hot, cold):
            return Check(
                "kata:plug",
                WARN,
                detail + ": large-BAR devices need root ports",
                'hot_plug_vfio = "root-port"',
            )
        return Check("kata:plug", OK, detail)
    on_root = qemu.get("hotplug_vfio_on_root_bus")
    detail = f"hotplug_vfio_on_root_bus = {on_root!r}, pcie_root_port = {ports}"
    if on_root is True and isinstance(ports, int) and ports > 0:
        return Check("kata:plug", OK, detail)
    return Check(
        "kata:plug",
        WARN,
        detail + ": devices land behind a bridge, all in one guest "
        "group (kata#2899), large BARs may not fit",
        f"hotplug_vfio_on_root_bus = true, pcie_root_port = {PCIE_ROOT_PORTS}",
    )


def check_vfio_mode(data: dict[str, Any], settings: Settings, release: KataRelease) -> Check:
    mode = (data.get("runtime") or {}).get("vfio_mode", VFIO_MODE_HOOK)
    want = VFIO_MODE_AGENT if settings.guest == GUEST_AGENT else VFIO_MODE_HOOK
    detail = f'vfio_mode = "{mode}" for guest = "{settings.guest}"'
    if settings.guest == GUEST_AGENT and not release.has_vfio_mode:
        return Check(
            "kata:vfio_mode",
            FAIL,
            f'guest = "agent" needs Kata >= 2.3; {release}',
            'guest = "hook" in config.toml',
        )
    if mode == want:
        return Check("kata:vfio_mode", OK, detail)
    return Check("kata:vfio_mode", FAIL, detail, "kata-vfio-ctl install (after changing guest)")


def check_hook_path(qemu: dict[str, Any], settings: Settings) -> Check:
    have = qemu.get("guest_hook_path", "")
    if settings.guest == GUEST_AGENT:
        if have == settings.guest_hook_path:
            return Check(
                "kata:guest_hook_path",
                WARN,
                f'guest = "agent" but guest_hook_path '
                f"= {have!r}: the kata-vfio hook would rebind too",
                "kata-vfio-ctl install",
            )
        return Check(
            "kata:guest_hook_path",
            OK,
            f'guest = "agent": no kata-vfio hook (guest_hook_path = {have!r})',
        )
    if have == settings.guest_hook_path:
        return Check("kata:guest_hook_path", OK, f"guest_hook_path = {have!r}")
    return Check(
        "kata:guest_hook_path",
        FAIL,
        f"guest_hook_path = {have!r}, kata-vfio's hook is under {settings.guest_hook_path!r}",
        "kata-vfio-ctl install",
    )


def check_annotations(qemu: dict[str, Any], settings: Settings) -> Check:
    enabled = [str(p) for p in qemu.get("enable_annotations") or []]
    wanted = [
        k[len(HYPERVISOR_ANNOTATION_PREFIX) :]
        for k in settings.annotations
        if k.startswith(HYPERVISOR_ANNOTATION_PREFIX)
    ]
    refused = [s for s in wanted if not annotation_enabled(enabled, s)]
    detail = f"enable_annotations = {enabled}"
    if refused:
        return Check(
            "kata:enable_annotations",
            FAIL,
            detail + f": Kata refuses {refused} that config.toml [annotations] adds",
            "kata-vfio-ctl install (enables them), or drop them from [annotations]",
        )
    return Check(
        "kata:enable_annotations",
        OK,
        detail + " (kata-vfio needs none: config_path and vfio_mode are not gated)",
    )


def check_image(path: Path, qemu: dict[str, Any], settings: Settings) -> Check:
    initrd, image = qemu.get("initrd") or "", qemu.get("image") or ""
    guest = initrd or image
    if not guest:
        return Check(
            "kata:image",
            FAIL,
            f"{path} names no guest image or initrd",
            "kata-vfio-ctl install --guest-initrd build/kata-vfio-initrd.img",
        )
    if not os.path.isfile(guest):
        return Check("kata:image", FAIL, f"{guest} does not exist", "install the guest image")
    if settings.guest == GUEST_AGENT:
        return Check(
            "kata:image", OK, f"{guest} (the agent rebinds; it needs vfio-pci in the guest kernel)"
        )
    if initrd:
        return check_initrd_hook(initrd, settings.guest_hook_path)
    return Check(
        "kata:image",
        WARN,
        f"{image} is a disk image: kata-vfio cannot look inside",
        f"make sure it has {settings.guest_hook_path}/prestart/kata-vfio-hook, or "
        "kata-vfio-ctl install --guest-initrd build/kata-vfio-initrd.img",
    )


def check_initrd_hook(initrd: str, guest_hook_path: str) -> Check:
    """Is the hook in the initrd, where the agent looks (a real file: it skips symlinks)?"""
    from kata_vfio.run import CommandError, run

    wanted = f"{guest_hook_path.strip('/')}/prestart/kata-vfio-hook"
    try:
        listing = run(
            ["lsinitrd", initrd], what="listing the guest initrd", check=False, timeout=60
        ).stdout
    except CommandError as err:
        return Check("kata:image", WARN, f"cannot look into {initrd}: {err.message}", err.hint)
    for line in listing.splitlines():
        fields = line.split()
        if fields and fields[-1] == wanted:
            if line.startswith("-") and "x" in fields[0]:
                return Check("kata:image", OK, f"{initrd} has /{wanted}")
            return Check(
                "kata:image",
                FAIL,
                f"{initrd}: /{wanted} is not an executable file "
                "(the agent skips symlinks and non-executables)",
                "rebuild it with `make initrd`",
            )
    return Check(
        "kata:image",
        FAIL,
        f"{initrd} has no /{wanted}",
        "build the guest image with `make initrd` (initrd/90kata-vfio), or set "
        "guest_hook_path to where its hook is",
    )
