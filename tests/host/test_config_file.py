"""config.toml as untrusted input: a FIFO, a device or a huge file is one line and no hang,
for the passthrough verbs as for create; and a cached load never outlives the content it
came from (the cache is keyed by the bytes parsed, not by inode, size and mtime)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from kata_vfio.errors import ConfigError
from kata_vfio_host.settings import load_settings

from fakesys import FakeSysfs
from wrapper_run import SOURCE_PATH, make_recorder, wrapper_command


def run(argv: list[str], config: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": SOURCE_PATH,
        "KATA_VFIO_CONFIG": config,
        "RECORDER_OUT": str(cwd / "record.json"),
    }
    return subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=20, cwd=cwd, check=False
    )


@pytest.mark.parametrize("kind", ["fifo", "device", "huge", "directory"])
@pytest.mark.parametrize("verb", [["state", "c1"], ["create", "--bundle", ".", "c1"]])
def test_a_config_that_is_no_plain_file_is_one_line(
    tmp_path: Path, bundle: Path, kind: str, verb: list[str]
) -> None:
    config = tmp_path / "config.toml"
    if kind == "fifo":
        os.mkfifo(config)  # nobody ever writes: a blocking open would hang the verb
    elif kind == "device":
        config = Path("/dev/zero")
    elif kind == "huge":
        config.write_bytes(b"# " + b"x" * (2 << 20) + b"\n")
    else:
        config.mkdir()
    done = run([*wrapper_command(), *verb], str(config), bundle)  # timeout: no hang
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(config) in lines[0], done.stderr
    assert "Traceback" not in done.stderr and not (bundle / "record.json").exists()


def test_a_config_saved_with_the_same_size_and_mtime_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("kata_vfio_host.cache.CACHE_DIR", str(tmp_path / "cache"))
    config = tmp_path / "config.toml"
    config.write_text('runtime = "/usr/bin/aaaa"\n')
    assert load_settings(str(config)).runtime == "/usr/bin/aaaa"
    st = config.stat()
    with open(config, "r+") as f:  # in place: same inode, same size ...
        f.write('runtime = "/usr/bin/bbbb"\n')
    os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and the same mtime
    assert config.stat().st_ino == st.st_ino and config.stat().st_size == st.st_size
    assert load_settings(str(config)).runtime == "/usr/bin/bbbb"


def test_the_passthrough_verbs_follow_the_new_content(
    tmp_path: Path, vfio_host: FakeSysfs, bundle: Path
) -> None:
    """The same through the runtime wrapper: `state` runs whichever runtime the file names
    now, even when the file kept its size and mtime."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    rec, rec2 = make_recorder(tmp_path / "one"), make_recorder(tmp_path / "two")
    config = tmp_path / "config.toml"
    config.write_text(f'runtime = "{rec}"\nstate_dir = "{tmp_path / "state"}"\n')
    assert run([*wrapper_command(), "state", "c1"], str(config), bundle).returncode == 0
    st = config.stat()
    with open(config, "r+") as f:
        f.write(f'runtime = "{rec2}"\nstate_dir = "{tmp_path / "state"}"\n')
    os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns))
    (bundle / "record.json").unlink()
    assert run([*wrapper_command(), "state", "c1"], str(config), bundle).returncode == 0
    assert json.loads((bundle / "record.json").read_text())["argv"][0] == str(rec2)


def test_load_settings_refuses_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="is not a regular file"):
        load_settings(str(fifo))
