"""The ownership ledger as it is on disk, for tests that look at the files themselves.

Since issue 15 (scale) the ledger is one file per IOMMU group, `<state_dir>/ledger/
group-<N>.json`, plus `host.json` for what belongs to no group. Tests read and write it
here as the tables of the single journal it replaced (devices, claims, vf_configs,
damaged_devices), straight from the JSON files (not through the code under test), and
`read_ledger` checks on the way that every entry sits in its own group's file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

TABLES = ("devices", "claims", "vf_configs", "damaged_devices")
HOST_FILE = "host.json"


def ledger_dir(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / "ledger"


def _file_for(kind: str, key: str, obj: Any) -> str:
    if kind == "claims":
        return f"group-{key}.json" if key.isdigit() else HOST_FILE
    group = obj.get("group") if isinstance(obj, dict) else None
    if kind in ("devices", "vf_configs") and type(group) is int and group >= 0:
        return f"group-{group}.json"
    return HOST_FILE


def read_ledger(state_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Every ledger file merged: {"version", "devices", "claims", "vf_configs",
    "damaged_devices"} ({} tables when there is no ledger yet)."""
    merged: dict[str, Any] = {t: {} for t in TABLES}
    directory = ledger_dir(state_dir)
    versions = set()
    names = sorted(os.listdir(directory)) if directory.is_dir() else []
    for name in names:
        if name.startswith("."):
            continue  # a write in progress
        data = json.loads((directory / name).read_text())
        versions.add(data["version"])
        for kind in TABLES:
            for key, obj in data.get(kind, {}).items():
                if kind != "damaged_devices":
                    assert _file_for(kind, key, obj) == name, (kind, key, name)
                assert key not in merged[kind], (kind, key, "in two files")
                merged[kind][key] = obj
    assert len(versions) <= 1, versions
    merged["version"] = versions.pop() if versions else None
    return merged


def write_ledger(state_dir: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Replace the ledger by these tables (a hand-edited ledger), each entry in its
    group's file as the layout puts it."""
    directory = ledger_dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.iterdir():
        old.unlink()
    files: dict[str, dict[str, Any]] = {}
    for kind in TABLES:
        for key, obj in (data.get(kind) or {}).items():
            name = _file_for(kind, key, obj)
            files.setdefault(name, {"version": 3}).setdefault(kind, {})[key] = obj
    for name, content in files.items():
        (directory / name).write_text(json.dumps(content))


def claims(state_dir: str | os.PathLike[str]) -> dict[str, Any]:
    return dict(read_ledger(state_dir)["claims"])
