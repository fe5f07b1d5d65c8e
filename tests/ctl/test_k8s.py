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
        [
            python,
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(sys.stdin))))",
        ],
        input=text,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_runtimeclass_and_sample_pod(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = ctl(
        capsys,
        "runtimeclass",
        "--overhead-cpu",
        "250m",
        "--overhead-memory",
        "160Mi",
        "--device",
        "0000:03:00.0",
        "--device",
        "0000:04:00.1",
    )
    assert code == 0
    runtime_class, pod = parse_yaml(out)
    assert runtime_class == {
        "apiVersion": "node.k8s.io/v1",
        "kind": "RuntimeClass",
        "metadata": {"name": "kata-vfio"},
        "handler": "kata-vfio",
        "overhead": {"podFixed": {"cpu": "250m", "memory": "160Mi"}},
    }
    assert pod["kind"] == "Pod"
    assert pod["spec"]["runtimeClassName"] == "kata-vfio"
    assert pod["metadata"]["annotations"] == {"io.kata-vfio.devices": "0000:03:00.0,0000:04:00.1"}
    assert pod["spec"]["containers"][0]["securityContext"] == {
        "capabilities": {"add": ["IPC_LOCK"]}
    }
    assert "\n---\n" in out

    code, out = ctl(
        capsys,
        "runtimeclass",
        "--overhead-cpu",
        "250m",
        "--overhead-memory",
        "160Mi",
        "--device",
        "0000:03:00.0",
        "--device",
        "0000:04:00.1",
        "--json",
    )
    assert json.loads(out) == {"apiVersion": "v1", "kind": "List", "items": [runtime_class, pod]}


def test_defaults_without_overhead_and_only_the_class(capsys: pytest.CaptureFixture[str]) -> None:
    _, out = ctl(capsys, "runtimeclass", "--no-pod", "--json")
    assert json.loads(out)["items"] == [
        {
            "apiVersion": "node.k8s.io/v1",
            "kind": "RuntimeClass",
            "metadata": {"name": "kata-vfio"},
            "handler": "kata-vfio",
        }
    ]
    _, out = ctl(capsys, "runtimeclass")
    assert parse_yaml(out)[1]["metadata"]["annotations"] == {"io.kata-vfio.devices": "0000:03:00.0"}


@pytest.mark.parametrize(
    "value",
    [
        "yes",
        "off",
        "Null",
        "0000:03:00.0",
        "12:30",
        "1e3",
        'quote " and \\ and\nnewline',
        "-c",
        "a: b",
        "#x",
        "[x]",
    ],
)
def test_strings_that_yaml_would_misread_stay_strings(
    capsys: pytest.CaptureFixture[str], value: str
) -> None:
    _, out = ctl(capsys, "runtimeclass", f"--handler={value}", f"--image={value}")
    runtime_class, pod = parse_yaml(out)
    assert runtime_class["handler"] == value
    assert pod["spec"]["containers"][0]["image"] == value


def test_bad_address_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = ctl(capsys, "runtimeclass", "--device", "03:00.0")
    assert code == 1 and out == ""


# --- kata-vfio-ctl k8s: one manifest per flag, checked against Kubernetes' own schemas ------

K8S_VERSION = "1.32"  # the schemas of one release (kubernetes-validate ships them)


def k8s_validate(obj: Any) -> None:
    """Strict validation (no unknown fields) against the release's OpenAPI schemas."""
    import kubernetes_validate

    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("flag", ["--daemonset", "--runtimeclass", "--pod"])
def test_each_k8s_manifest_is_one_valid_object(
    capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    code, out = ctl(capsys, "k8s", flag)
    assert code == 0
    (obj,) = parse_yaml(out)  # exactly one manifest: `| kubectl apply -f -` applies it alone
    k8s_validate(obj)
    code, out = ctl(capsys, "k8s", flag, "--json")
    assert code == 0 and json.loads(out) == obj


def test_daemonset_is_privileged_with_the_host_paths(capsys: pytest.CaptureFixture[str]) -> None:
    _, out = ctl(
        capsys,
        "k8s",
        "--daemonset",
        "--image",
        "registry.example/kata-vfio:1",
        "--node-label",
        "example.com/vfio=yes",
    )
    (ds,) = parse_yaml(out)
    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["securityContext"] == {"privileged": True}
    assert container["image"] == "registry.example/kata-vfio:1"
    assert container["command"] == ["kata-vfio-ctl", "device-plugin"]
    assert pod["nodeSelector"] == {"example.com/vfio": "yes"}
    paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    assert set(paths.values()) >= {
        "/sys",
        "/dev/vfio",
        "/var/lib/kubelet/device-plugins",
        "/etc/kata-vfio",
        "/var/lib/kata-vfio",
        "/var/run/cdi",
    }
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == paths  # each host path at the same place inside
    assert ds["spec"]["selector"]["matchLabels"] == ds["spec"]["template"]["metadata"]["labels"]


def test_runtimeclass_and_resource_pod(capsys: pytest.CaptureFixture[str]) -> None:
    _, out = ctl(capsys, "k8s", "--runtimeclass", "--overhead-cpu", "500m")
    (rc,) = parse_yaml(out)
    assert rc["handler"] == "kata-vfio"
    assert rc["overhead"] == {"podFixed": {"cpu": "500m", "memory": "160Mi"}}
    assert rc["scheduling"] == {"nodeSelector": {"kata-vfio.io/node": "true"}}
    _, out = ctl(capsys, "k8s", "--pod", "--resource", "nics")
    (pod,) = parse_yaml(out)
    assert pod["spec"]["runtimeClassName"] == "kata-vfio"
    assert pod["spec"]["containers"][0]["resources"] == {"limits": {"kata-vfio.io/nics": 1}}
    assert "PCIDEVICE_KATA_VFIO_IO_NICS" in pod["spec"]["containers"][0]["command"][2]


def test_the_validator_catches_a_broken_manifest(capsys: pytest.CaptureFixture[str]) -> None:
    """The schema check is strict: what a typo would produce is refused."""
    import kubernetes_validate

    _, out = ctl(capsys, "k8s", "--daemonset", "--json")
    ds = json.loads(out)
    ds["spec"]["template"]["spec"]["volumes"][0]["hostPath"]["typ"] = "Directory"
    with pytest.raises(kubernetes_validate.ValidationError, match="'typ' was unexpected"):
        k8s_validate(ds)


@pytest.mark.parametrize(
    "argv", [["--node-label", "novalue"], ["--resource", "Bad Name"], ["--node-label", "a b=c"]]
)
def test_bad_k8s_options_are_refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out = ctl(capsys, "k8s", "--pod", *argv)
    assert code != 0 and out == ""
