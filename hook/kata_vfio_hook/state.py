"""The OCI state the runtime gives the hook on stdin, and where its manifest is.

On every container's path (most have no manifest), so it imports what main.py does and no
more: the C JSON codec and the errors.
"""

from __future__ import annotations

from kata_vfio.defaults import ID_HINT, MANIFEST_ANNOTATION, id_problem, plain_container_id
from kata_vfio.errors import HookError
from kata_vfio.jsoncodec import loads

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

LIBCONTAINER = "/run/libcontainer"  # Kata 1.x keeps each container's spec below it


class State:
    """The OCI state the runtime passes on stdin. Not a `kata_vfio.value` class: every
    container's hook makes one, most with no manifest, and those import no more than
    main.py does (tests/project/test_lean_paths.py)."""

    __slots__ = ("annotations", "bundle", "id", "pid")

    def __init__(self, id: str, pid: int, bundle: str, annotations: dict[str, str]) -> None:
        self.id = id
        self.pid = pid
        self.bundle = bundle
        self.annotations = annotations


def parse_state(text: str) -> State:
    try:
        data = loads(text)
    except ValueError:
        raise HookError(
            "stdin is not the OCI state JSON", "run me as an OCI prestart hook"
        ) from None
    if not isinstance(data, dict):
        raise HookError("stdin is not the OCI state JSON", "run me as an OCI prestart hook")
    cid, pid, bundle = data.get("id"), data.get("pid"), data.get("bundle")
    if not plain_container_id(cid):
        raise HookError(f"OCI state has {id_problem(cid)}", ID_HINT)
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise HookError(
            f"OCI state of {cid} has no container pid",
            "run me as a prestart hook, when the container's init exists",
        )
    annotations = data.get("annotations") or {}
    return State(
        cid,
        pid,
        bundle if isinstance(bundle, str) else "",
        annotations if isinstance(annotations, dict) else {},
    )


def _load_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            data = loads(f.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def find_manifest(state: State, libcontainer: str) -> tuple[str, dict[str, Any]] | None:
    """The manifest's text from the state's annotations, the bundle's config.json, or
    Kata 1.x's copy under /run/libcontainer; with the spec (empty if none could be read)."""
    specs = []
    if state.bundle:
        specs.append(f"{state.bundle}/config.json")
    specs.append(f"{libcontainer}/{state.id}/config.json")
    spec: dict[str, Any] = {}
    for path in specs:
        loaded = _load_json(path)
        if loaded is not None:
            spec = loaded
            break
    text = state.annotations.get(MANIFEST_ANNOTATION)
    if text is None:
        annotations = spec.get("annotations")
        text = annotations.get(MANIFEST_ANNOTATION) if isinstance(annotations, dict) else None
    return (text, spec) if text and isinstance(text, str) else None
