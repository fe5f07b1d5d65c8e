"""Every fast test that touches the real host says so: the `host` marker (pyproject.toml).

A test's own code (or a fixture of its file) that makes interfaces or network namespaces,
reads the default route, mounts, enters a new mount namespace or runs the installed
containerd is a host test. Files whose every test carries a slower marker (vm, podman,
containerd, kubelet, kata, kata3) are host tests by that marker already."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
WHOLE_FILE_MARKS = {"vm", "podman", "containerd", "kubelet", "kata", "kata3", "dracut"}
# what a test's code says when it touches the host
HOST_WORDS = (
    '"unshare"',
    '"mount"',
    '"ip", "link", "add"',
    '"ip", "netns"',
    "/proc/net/route",
    '["containerd", ',
)


def _marks(decorators: list[ast.expr]) -> set[str]:
    names = set()
    for d in decorators:
        node = d.func if isinstance(d, ast.Call) else d
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "mark"
        ):
            names.add(node.attr)
    return names


def _file_marks(tree: ast.Module) -> set[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets
        ):
            value = node.value
            return _marks(list(value.elts) if isinstance(value, ast.List) else [value])
    return set()


def unmarked_host_tests() -> list[str]:
    found = []
    for path in sorted(TESTS.rglob("test_*.py")):
        if path.name == Path(__file__).name:  # its words are examples
            continue
        text = path.read_text()
        tree = ast.parse(text)
        if _file_marks(tree) & WHOLE_FILE_MARKS:
            continue
        functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        touching = {
            name
            for name, f in functions.items()
            if any(w in (ast.get_source_segment(text, f) or "") for w in HOST_WORDS)
        }
        for name, f in functions.items():
            if not name.startswith("test_"):
                continue
            uses = {a.arg for a in f.args.args} & touching  # a fixture of this file that does
            if (name in touching or uses) and "host" not in _marks(f.decorator_list):
                found.append(f"{path.name}::{name}")
    return found


def test_every_test_that_touches_the_host_is_marked() -> None:
    assert unmarked_host_tests() == []


def test_the_check_sees_an_unmarked_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "test_x.py").write_text(
        'import subprocess\n\n\ndef test_a():\n    subprocess.run(["unshare", "-m", "true"])\n'
    )
    monkeypatch.setattr(__import__(__name__), "TESTS", tmp_path)
    assert unmarked_host_tests() == ["test_x.py::test_a"]
