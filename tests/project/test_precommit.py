"""The pre-commit configuration (issue 18 point 6): valid for pre-commit, local hooks only
(the venv's ruff and mypy, nothing fetched at commit time), and its hooks really fail on
what `make lint` fails on."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv/bin"
CONFIG = REPO / ".pre-commit-config.yaml"


def pre_commit(args: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PRE_COMMIT_HOME": str(home), "NO_COLOR": "1"}
    return subprocess.run(
        [str(VENV_BIN / "pre-commit"), *args],
        cwd=cwd,
        env=env,
        text=True,
        capture_output=True,
        timeout=300,
    )


def test_the_configuration_is_valid_and_fetches_nothing(tmp_path: Path) -> None:
    result = pre_commit(["validate-config", str(CONFIG)], tmp_path, tmp_path / "home")
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(CONFIG.read_text())
    assert [r["repo"] for r in config["repos"]] == ["local"]
    hooks = {h["id"]: h for h in config["repos"][0]["hooks"]}
    assert set(hooks) == {"ruff", "ruff-format", "mypy"}
    for hook in hooks.values():
        assert hook["language"] == "system" and hook["entry"].startswith(".venv/bin/"), hook
        assert (REPO / hook["entry"].split()[0]).exists(), hook["entry"]


def test_the_hooks_fail_on_a_bad_file(tmp_path: Path) -> None:
    """In a scratch repository with this configuration and the project's venv: a file
    with an unused import and odd formatting fails ruff and ruff format, by name."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    shutil.copy(CONFIG, tmp_path / ".pre-commit-config.yaml")
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    (tmp_path / "bad.py").write_text("import os\nx=( 1,\n2)\n")
    subprocess.run(["git", "add", "bad.py", ".pre-commit-config.yaml"], cwd=tmp_path, check=True)
    for hook, says in (("ruff", "F401"), ("ruff-format", "bad.py")):
        result = pre_commit(["run", hook, "--files", "bad.py"], tmp_path, tmp_path / ".home")
        assert result.returncode == 1 and "Failed" in result.stdout and says in result.stdout, (
            hook,
            result.stdout,
        )
    (tmp_path / "bad.py").write_text("x = (1, 2)\n")
    for hook in ("ruff", "ruff-format"):
        result = pre_commit(["run", hook, "--files", "bad.py"], tmp_path, tmp_path / ".home")
        assert result.returncode == 0, (hook, result.stdout)


def test_the_mypy_hook_checks_what_make_lint_checks(tmp_path: Path) -> None:
    """Run in this repository: mypy over pyproject's files, the set make lint checks."""
    result = pre_commit(
        ["run", "mypy", "--files", "common/kata_vfio/defaults.py"], REPO, tmp_path / "home"
    )
    assert result.returncode == 0, result.stdout
    assert "Passed" in result.stdout
    makefile = (REPO / "Makefile").read_text()
    assert "$(VENV)/bin/mypy  #" in makefile  # no file list of its own: pyproject's
