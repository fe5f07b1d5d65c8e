"""`kata-vfio-ctl runtimeclass`: manifests a YAML parser reads back as intended."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from typing import Any

import pytest

from kata_vfio.errors import KataVfioError
from kata_vfio_ctl import k8s


def ctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    k8s.add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args))
    except KataVfioError as err:
        code = err.exit_code
    return code, capsys.readouterr().out


def parse_yaml(text: str) -> list[Any]:
    """PyYAML (Debian's python3-yaml) in the system interpreter: the venv needs none."""
    python = shutil.which("python3", path="/usr/bin")
    probe = subprocess.run([python or "python3", "-c", "import yaml"], capture_output=True)
    if python is None or probe.returncode != 0:
        pytest.skip("needs python3-yaml")
    done = subprocess.run(
        [python, "-c", "import json, sys, yaml; "
                       "print(json.dumps(list(yaml.safe_load_all(sys.stdin))))"],
        input=text, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_runtimeclass_and_sample_pod(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = ctl(capsys, "runtimeclass", "--overhead-cpu", "250m",
                    "--overhead-memory", "160Mi", "--device", "0000:03:00.0",
                    "--device", "0000:04:00.1")
    assert code == 0
    runtime_class, pod = parse_yaml(out)
    assert runtime_class == {
        "apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
        "metadata": {"name": "kata-vfio"}, "handler": "kata-vfio",
        "overhead": {"podFixed": {"cpu": "250m", "memory": "160Mi"}}}
    assert pod["kind"] == "Pod"
    assert pod["spec"]["runtimeClassName"] == "kata-vfio"
    assert pod["metadata"]["annotations"] == {"io.kata-vfio.devices": "0000:03:00.0,0000:04:00.1"}
    assert pod["spec"]["containers"][0]["securityContext"] == {
        "capabilities": {"add": ["IPC_LOCK"]}}
    assert "\n---\n" in out

    code, out = ctl(capsys, "runtimeclass", "--overhead-cpu", "250m",
                    "--overhead-memory", "160Mi", "--device", "0000:03:00.0",
                    "--device", "0000:04:00.1", "--json")
    assert json.loads(out) == {"apiVersion": "v1", "kind": "List",
                               "items": [runtime_class, pod]}


def test_defaults_without_overhead_and_only_the_class(capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    _, out = ctl(capsys, "runtimeclass", "--no-pod", "--json")
    assert json.loads(out)["items"] == [{
        "apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
        "metadata": {"name": "kata-vfio"}, "handler": "kata-vfio"}]
    _, out = ctl(capsys, "runtimeclass")
    assert parse_yaml(out)[1]["metadata"]["annotations"] == {
        "io.kata-vfio.devices": "0000:03:00.0"}


@pytest.mark.parametrize("value", ["yes", "off", "Null", "0000:03:00.0", "12:30", "1e3",
                                   'quote " and \\ and\nnewline', "-c", "a: b", "#x", "[x]"])
def test_strings_that_yaml_would_misread_stay_strings(capsys: pytest.CaptureFixture[str],
                                                      value: str) -> None:
    _, out = ctl(capsys, "runtimeclass", f"--handler={value}", f"--image={value}")
    runtime_class, pod = parse_yaml(out)
    assert runtime_class["handler"] == value
    assert pod["spec"]["containers"][0]["image"] == value


def test_bad_address_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = ctl(capsys, "runtimeclass", "--device", "03:00.0")
    assert code == 1 and out == ""
