"""Exit codes tell the truth: a delete whose devices could not be given back exits non-zero
with one line naming them, on both wrappers (podman's kata-vfio delete, the shim's delete
clean-up action), even when the inner runtime's own delete succeeded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kata_vfio.jsonlog import JsonLog
from kata_vfio.manifest import DEVICES_ANNOTATION
from kata_vfio_host.ledger import Host
from kata_vfio_host.settings import Settings
from kata_vfio_runtime.lifecycle import prepare_bundle

from fakesys import FakeKernel, FakeSysfs
from wrapper_run import SOURCE_PATH, make_recorder, write_config

NVME_ADDR = "0000:05:00.0"  # on nvme in vfio_host: auto-bound by the create below


def auto_bound_container(tmp_path: Path, fs: FakeSysfs, cid: str) -> Path:
    """A container created with [autobind]: the NVMe moved to vfio-pci by a (fake) kernel.
    Returns the config.toml the wrappers then run with: the same host, no kernel behind
    the sysfs writes, so giving the device back cannot succeed."""
    kernel = FakeKernel(fs)
    state = tmp_path / "state"
    settings = Settings(sysfs=str(fs.root), state_dir=str(state), autobind_allow=(NVME_ADDR,))
    bundle = tmp_path / "bundles" / cid
    bundle.mkdir(parents=True)
    (bundle / "config.json").write_text(
        json.dumps(
            {
                "ociVersion": "1.0.2",
                "process": {"args": ["true"]},
                "root": {"path": "rootfs"},
                "annotations": {DEVICES_ANNOTATION: NVME_ADDR},
            }
        )
    )
    prepare_bundle(cid, str(bundle), settings, Host(fs.root, state, kernel.write), JsonLog(None))
    assert fs.driver(NVME_ADDR) == "vfio-pci"
    recorder = make_recorder(tmp_path)
    return write_config(
        tmp_path,
        runtime=str(recorder),
        shim=str(recorder),
        sysfs=str(fs.root),
        log_file=str(tmp_path / "log"),
        autobind={"allow": [NVME_ADDR]},
    )


@pytest.mark.parametrize("wrapper", ["kata-vfio", "shim"])
def test_delete_that_cannot_give_back_exits_non_zero(
    tmp_path: Path, vfio_host: FakeSysfs, wrapper: str
) -> None:
    config = auto_bound_container(tmp_path, vfio_host, "c1")
    if wrapper == "kata-vfio":
        argv = [sys.executable, "-m", "kata_vfio_runtime.main", "delete", "c1"]
    else:
        argv = [
            sys.executable,
            "-m",
            "kata_vfio_runtime.shim",
            "-namespace",
            "default",
            "-address",
            "/run/containerd/containerd.sock",
            "-id",
            "c1",
            "delete",
        ]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": SOURCE_PATH,
        "KATA_VFIO_CONFIG": str(config),
        "RECORDER_OUT": str(tmp_path / "record.json"),
    }
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert (tmp_path / "record.json").exists()  # the inner delete ran and succeeded
    assert done.returncode != 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "delete c1: could not give back" in lines[0], done.stderr
    assert NVME_ADDR in lines[0]
