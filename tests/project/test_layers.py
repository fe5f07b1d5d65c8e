"""The import graph of our packages: no circle, and no import from a lower layer to a higher.

Layers, lowest first: common (kata_vfio) <- host (kata_vfio_host) and guest (kata_vfio_hook)
<- the runtime wrappers (kata_vfio_runtime) and the admin tool (kata_vfio_ctl). Every
import counts, those inside functions and under TYPE_CHECKING too: a lazy import is still a
dependency, and a circle through one is still a circle a reader has to untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {
    "kata_vfio": REPO / "common" / "kata_vfio",
    "kata_vfio_host": REPO / "wrapper" / "kata_vfio_host",
    "kata_vfio_hook": REPO / "hook" / "kata_vfio_hook",
    "kata_vfio_runtime": REPO / "wrapper" / "kata_vfio_runtime",
    "kata_vfio_ctl": REPO / "wrapper" / "kata_vfio_ctl",
}
# what each package may import of ours
ALLOWED = {
    "kata_vfio": {"kata_vfio"},
    "kata_vfio_host": {"kata_vfio", "kata_vfio_host"},
    "kata_vfio_hook": {"kata_vfio", "kata_vfio_hook"},
    "kata_vfio_runtime": {"kata_vfio", "kata_vfio_host", "kata_vfio_runtime"},
    "kata_vfio_ctl": {"kata_vfio", "kata_vfio_host", "kata_vfio_ctl"},
}


def modules() -> dict[str, Path]:
    out = {}
    for package, top in PACKAGES.items():
        for path in top.rglob("*.py"):
            parts = path.relative_to(top).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ours `name` imports (a `from P import m` of a submodule names m)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    out.add(f"{base}.{alias.name}")
                elif base in known:
                    out.add(base)
    out.discard(name)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read() -> None:
    edges = graph()
    # a few edges that exist: the reader sees absolute, submodule and function-level imports
    assert "kata_vfio_hook.state" in edges["kata_vfio_hook.main"]
    assert "kata_vfio.jsoncodec" in edges["kata_vfio_hook.state"]
    assert "kata_vfio_host.ledger" in edges["kata_vfio_ctl.main"] | {
        m for v in edges["kata_vfio_ctl.main"] for m in edges[v]
    }


def test_no_import_circle() -> None:
    found = circles(graph())
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_circles_are_found() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(edges) == [["a", "b", "c"]]


def test_no_import_from_a_lower_layer_to_a_higher() -> None:
    wrong = sorted(
        f"{a} imports {b}"
        for a, outs in graph().items()
        for b in outs
        if b.split(".")[0] not in ALLOWED[a.split(".")[0]]
    )
    assert not wrong, "\n".join(wrong)


def test_the_hook_entry_point_is_imported_by_none_of_ours() -> None:
    importers = sorted(a for a, outs in graph().items() if "kata_vfio_hook.main" in outs)
    assert not importers, importers
