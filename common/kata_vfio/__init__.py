"""Shared core of kata-vfio: the PCI/sysfs model and the device manifest.

Imported by the host wrapper, the host tools and the guest hook alike, so it
uses the standard library only.

The lean-import rule (stated here once): the guest hook and ``kata-vfio create`` / the
shim's ``start`` run once per container, and every passthrough verb once per runtime
call, so the modules on those paths import at module level none of typing,
dataclasses, pathlib, re, json, enum, inspect, copy, contextlib, collections, functools,
tempfile (each costs a good part of a bare interpreter start), nor the heavy libraries
(structlog, jsonschema, tomllib, tomlkit, pyroute2, psutil). Such a module writes
``TYPE_CHECKING = False`` (not ``typing.TYPE_CHECKING``) and imports type-only names
under ``if TYPE_CHECKING:``, from the stub `kata_vfio.types` (Protocols, aliases) which
has no run-time module; value types are `kata_vfio.value.Value` classes, which cost nothing
to a path that makes none. ruff's TID253 (pyproject.toml) and
tests/project/test_lean_paths.py enforce it.
"""

__version__ = "0.1.0"
