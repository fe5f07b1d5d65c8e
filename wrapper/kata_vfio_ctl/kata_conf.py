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

KATA_CONFIGS = (
    Path("/etc/kata-containers/configuration.toml"),
    Path("/usr/share/defaults/kata-containers/configuration.toml"),
    # Kata's release tarball and kata-deploy (3.x)
    Path("/opt/kata/share/defaults/kata-containers/configuration.toml"),
)
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
        k[len(HYPERVISOR_ANNOTATION_PREFIX) :]
        for k in annotations
        if k.startswith(HYPERVISOR_ANNOTATION_PREFIX)
    ]
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


def _read(path: Path) -> Any:
    from kata_vfio_ctl.textfile import read_found

    found = read_found(path, "Kata configuration")
    if not found.exists:
        raise ConfigError(f"Kata configuration {path} does not exist", "pass --kata-config PATH")
    return found


def check(
    path: Path, guest_hook_path: str, annotations: dict[str, str]
) -> list[tuple[str, bool, str]]:
    """(setting, ok, what to set) for each setting kata-vfio needs."""
    import tomllib

    try:
        data = tomllib.loads(_read(path).text)
    except tomllib.TOMLDecodeError as exc:
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


RECORD_NAME = "install.json"


def read_record(record_path: Path) -> dict[str, Any]:
    """An install record (bounded, never blocking); {} when there is none."""
    from kata_vfio_ctl.textfile import read_bytes

    raw = read_bytes(record_path, "install record")
    if raw is None:
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(
            f"cannot read install record {record_path}: {exc}", "remove it and run install again"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"install record {record_path} is not a JSON object", "remove it and run install again"
        )
    return data


def write_record(record_path: Path, record: dict[str, Any]) -> None:
    from kata_vfio.files import write_atomically

    record_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(record_path, json.dumps(record, indent=1).encode())


def _parse(path: Path, text: str) -> Any:
    import tomllib

    try:
        tomllib.loads(text)  # Kata reads TOML 1.0; tomlkit is laxer
        return tomlkit.parse(text)
    except Exception as exc:
        raise ConfigError(f"cannot read {path}: {exc}", "fix or reinstall Kata") from None


def _problem(before: str, after: str, path: Path, values: dict[str, Any]) -> str | None:
    """Why `after` is not `before` with `values` set in its hypervisor table, as Kata
    reads it; None when it is."""
    import tomllib

    try:
        new, old = tomllib.loads(after), tomllib.loads(before)
    except tomllib.TOMLDecodeError as exc:
        return f"the result would not be valid TOML: {exc}"
    name, _ = hypervisor_table(old, path)
    table = (new.get("hypervisor") or {}).get(name)
    if not isinstance(table, dict):
        return f"[hypervisor.{name}] would be lost"
    plain = {k: v.unwrap() if hasattr(v, "unwrap") else v for k, v in values.items()}
    if any(table.get(k) != v for k, v in plain.items()):
        return f"the settings would not land in [hypervisor.{name}]"
    for key in plain:
        table.pop(key, None)
        old["hypervisor"][name].pop(key, None)
    if new != old:
        return "other settings would change"
    return None


def install(
    path: Path, state_dir: Path, guest_hook_path: str, annotations: dict[str, str]
) -> list[str]:
    """Set what kata-vfio needs; returns the keys changed. Idempotent.

    The record (keyed by the file's real path) keeps each value replaced and the file's
    bytes before and after: uninstall gives back the very bytes while the file is as
    install left it, and puts the values back (in the file's form) once it was edited.
    """
    found = _read(path)
    doc = _parse(path, found.text)
    _, table = hypervisor_table(doc, path)
    record_path = state_dir / RECORD_NAME
    record = read_record(record_path)
    entry = record.get(str(found.target)) or {"keys": {}, "before": found.raw.decode()}
    if "keys" not in entry:  # a record of an older kata-vfio-ctl: the values alone
        entry = {"keys": entry, "before": None}
    originals = entry["keys"]
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
        text = tomlkit.dumps(doc)
        problem = _problem(found.text, text, path, {k: table[k] for k in changed})
        if problem is not None:
            raise ConfigError(
                f"{path}: cannot set {', '.join(changed)} in this layout safely "
                f"({problem}); nothing was changed",
                "write [hypervisor.NAME] as a table of plain keys, or set them "
                "by hand (kata-vfio-ctl doctor says what is missing)",
            )
        if entry.get("after") not in (None, found.raw.decode()):
            entry["before"] = None  # edited since the last install: its bytes are not ours
        entry["after"] = found.render(text).decode()
        record[str(found.target)] = entry
        write_record(record_path, record)  # first: an uninstall must know what we did
        found.save(text)
    return changed


def uninstall(path: Path, state_dir: Path) -> list[str]:
    """Put back what install changed in `path`; returns the keys restored. A path install
    never edited changes nothing, here or in the record."""
    from kata_vfio.files import write_atomically

    record_path = state_dir / RECORD_NAME
    record = read_record(record_path)
    found = _read(path)
    name = next((n for n in (str(found.target), str(path)) if n in record), None)
    if name is None:
        return []
    entry = record[name]
    originals = entry.get("keys", entry) if isinstance(entry, dict) else {}
    if entry.get("before") is not None and found.raw == str(entry.get("after")).encode():
        write_atomically(found.target, str(entry["before"]).encode())  # the very bytes
    elif originals:
        doc = _parse(path, found.text)
        _, table = hypervisor_table(doc, path)
        for key, original in originals.items():
            if original["present"]:
                table[key] = original["value"]
            elif key in table:
                del table[key]
        found.save(tomlkit.dumps(doc))
    del record[name]
    write_record(record_path, record)
    return sorted(originals)
