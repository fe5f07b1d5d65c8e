"""The official OCI runtime-spec JSON schemas (Debian golang-github-opencontainers-specs-dev)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

SCHEMA_DIR = Path("/usr/share/gocode/src/github.com/opencontainers/runtime-spec/schema")


def validator(name: str = "config-schema.json") -> jsonschema.Draft4Validator:
    resources = []
    for path in SCHEMA_DIR.glob("*.json"):
        contents = json.loads(path.read_text())
        resources.append((path.as_uri(), Resource.from_contents(contents, DRAFT4)))
    registry: Registry[Any] = Registry().with_resources(resources)
    schema = {**json.loads((SCHEMA_DIR / name).read_text()), "id": (SCHEMA_DIR / name).as_uri()}
    return jsonschema.Draft4Validator(schema, registry=registry)


def schema_errors(spec: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator().iter_errors(spec)
    ]
