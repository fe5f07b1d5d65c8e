"""kata_vfio.jsoncodec gives what json gives: same values, same text, same errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from kata_vfio import jsoncodec

VALUES = [
    "x",
    'é\u2028"\\\n\t\x00',
    0,
    -1,
    10**30,
    2.5,
    -0.0,
    1e300,
    None,
    True,
    False,
    [],
    {},
    [1, [2, [3, {"a": None}]]],
    {"b": 1, "a": [1.5, "z"], "": {}},
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_same_text_and_round_trip(value: object) -> None:
    assert jsoncodec.dumps(value) == json.dumps(value)
    assert jsoncodec.dumps(value, compact=True) == json.dumps(value, separators=(",", ":"))
    assert jsoncodec.loads(json.dumps(value)) == value
    assert jsoncodec.loads(json.dumps(value, indent=2).encode()) == value


def test_a_real_config_json(tmp_path: Path) -> None:
    subprocess.run(["runc", "spec", "--bundle", str(tmp_path)], check=True)
    text = (tmp_path / "config.json").read_text()
    assert jsoncodec.loads(text) == json.loads(text)
    spec = json.loads(text)
    assert jsoncodec.dumps(spec) == json.dumps(spec)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "  ",
        "{",
        "[1,]",
        '{"a":1} x',
        "nul",
        '"\\x"',
        '{"a" 1}',
        "[1] [2]",
        '{"a":1,}',
        "\ufeff{}",
    ],
)
def test_same_errors(text: str) -> None:
    with pytest.raises(ValueError) as ours:
        jsoncodec.loads(text)
    with pytest.raises(ValueError) as theirs:
        json.loads(text)
    assert str(ours.value) == str(theirs.value)


def test_non_utf8_bytes_and_unserializable_objects_are_errors() -> None:
    with pytest.raises(ValueError):
        jsoncodec.loads(b'{"a": "\xff"}')
    with pytest.raises(TypeError, match="not JSON serializable"):
        jsoncodec.dumps({"a": object()})
    assert jsoncodec.dumps({"a": object()}, default=lambda o: "obj") == '{"a": "obj"}'
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular"):
        jsoncodec.dumps(loop)


def test_bytes_with_a_bom_are_read_as_json_reads_them() -> None:
    raw = b'\xef\xbb\xbf{"a": [1]}'
    assert jsoncodec.loads(raw) == json.loads(raw) == {"a": [1]}


def test_errors_without_json_imported() -> None:
    """In a process that never imported json (the wrapper's create, the guest hook), a
    bad document is a ValueError with json's message, on every CPython 3.11 (3.11.2's C
    scanner fails without an exception there)."""
    code = (
        "import sys; sys.path.insert(0, 'common')\n"
        "from kata_vfio.jsoncodec import loads\n"
        'try:\n    loads(\'{"a": {"b": 1\')\n'
        "except ValueError as e:\n    print('ValueError', e)\n"
    )
    out = subprocess.run(
        ["/usr/bin/python3", "-I", "-S", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout
    assert out.startswith("ValueError Expecting ',' delimiter: line 1 column 14"), out
