"""The Kata configuration.toml settings kata-vfio needs: read (doctor) and written
(install/uninstall), with tomlkit so comments and every other setting survive.

install records each value it replaces in <state_dir>/install.json; uninstall puts
those back (and removes keys that were not there), so the pair is reversible.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tomlkit

from kata_vfio.errors import ConfigError

KATA_CONFIGS = (Path("/etc/kata-containers/configuration.toml"),
                Path("/usr/share/defaults/kata-containers/configuration.toml"),
                # Kata's release tarball and kata-deploy (3.x)
                Path("/opt/kata/share/defaults/kata-containers/configuration.toml"))
IOMMU_PARAMS = ("intel_iommu=on", "iommu=pt")
HYPERVISOR_ANNOTATION_PREFIX = "io.katacontainers.config.hypervisor."


def find_config(explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit)
    return next((p for p in KATA_CONFIGS if p.exists()), None)


def hypervisor_table(doc: Any, path: Path) -> tuple[str, Any]:
    hypervisors = doc.get("hypervisor")
    if not hypervisors:
        raise ConfigError(f"{path} has no [hypervisor.*] table", "is it a Kata configuration?")
    name = "qemu" if "qemu" in hypervisors else next(iter(hypervisors))
    return name, hypervisors[name]


def wanted_settings(guest_hook_path: str, annotations: dict[str, str]) -> dict[str, Any]:
    """Key -> value kata-vfio needs in the hypervisor table (lists: entries to include)."""
    suffixes = ["enable_iommu", "guest_hook_path"] + [
        k[len(HYPERVISOR_ANNOTATION_PREFIX):] for k in annotations
        if k.startswith(HYPERVISOR_ANNOTATION_PREFIX)]
    return {
        "machine_type": "q35",
        "enable_iommu": True,
        "hotplug_vfio_on_root_bus": True,
        "pcie_root_port": 2,
        "guest_hook_path": guest_hook_path,
        "kernel_params": list(IOMMU_PARAMS),
        "enable_annotations": sorted(set(suffixes)),
    }


def annotation_enabled(patterns: list[str], suffix: str) -> bool:
    """Kata matches enable_annotations entries as regular expressions on the suffix."""
    import re

    return any(re.fullmatch(p, suffix) for p in patterns)


def check(path: Path, guest_hook_path: str, annotations: dict[str, str]
          ) -> list[tuple[str, bool, str]]:
    """(setting, ok, what to set) for each setting kata-vfio needs."""
    import tomllib

    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}", "fix or reinstall Kata") from None
    _, table = hypervisor_table(data, path)
    results = []
    for key, want in wanted_settings(guest_hook_path, annotations).items():
        have = table.get(key)
        if key == "kernel_params":
            ok = all(p in str(have or "").split() for p in want)
            fix = f'kernel_params += "{" ".join(want)}"'
        elif key == "enable_annotations":
            ok = all(annotation_enabled(list(have or []), s) for s in want)
            fix = f"enable_annotations must include {want}"
        elif key == "pcie_root_port":
            ok = isinstance(have, int) and have > 0
            fix = "pcie_root_port = 2 (or more, one per device)"
        else:
            ok = have == want
            fix = f"{key} = {json.dumps(want)}"
        results.append((key, ok, fix))
    return results


def install(path: Path, state_dir: Path, guest_hook_path: str,
            annotations: dict[str, str]) -> list[str]:
    """Set what kata-vfio needs; returns the keys changed. Idempotent."""
    from kata_vfio.files import write_atomically

    doc = tomlkit.parse(path.read_text())
    _, table = hypervisor_table(doc, path)
    record_path = state_dir / "install.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    originals = record.setdefault(str(path), {})
    changed = []
    for key, want in wanted_settings(guest_hook_path, annotations).items():
        have = table.get(key)
        if key == "kernel_params":
            words = str(have or "").split()
            new: Any = " ".join(words + [p for p in want if p not in words])
        elif key == "enable_annotations":
            current = list(have or [])
            new = current + [s for s in want if not annotation_enabled(current, s)]
        elif key == "pcie_root_port":
            new = have if isinstance(have, int) and have > 0 else want
        else:
            new = want
        plain = have.unwrap() if hasattr(have, "unwrap") else have
        if plain == new:
            continue
        originals.setdefault(key, {"present": key in table, "value": plain})
        table[key] = new
        changed.append(key)
    if changed:
        write_atomically(path, tomlkit.dumps(doc).encode())
        state_dir.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(record, indent=1))
    return changed


def uninstall(path: Path, state_dir: Path) -> list[str]:
    """Put back what install changed in `path`; returns the keys restored."""
    from kata_vfio.files import write_atomically

    record_path = state_dir / "install.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    originals = record.pop(str(path), {})
    if not originals:
        return []
    doc = tomlkit.parse(path.read_text())
    _, table = hypervisor_table(doc, path)
    for key, original in originals.items():
        if original["present"]:
            table[key] = original["value"]
        elif key in table:
            del table[key]
    write_atomically(path, tomlkit.dumps(doc).encode())
    record_path.write_text(json.dumps(record, indent=1))
    return sorted(originals)
