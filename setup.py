"""Build hook: generate the kubelet API modules from their .proto files (grpcio-tools is
a build requirement in pyproject.toml); everything else is in pyproject.toml."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

GENERATOR = Path(__file__).resolve().parent / "wrapper/kata_vfio_ctl/kubeapi/generate.py"


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        super().run()
        spec = importlib.util.spec_from_file_location("kubeapi_generate", GENERATOR)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.generate(Path(self.build_lib))


setup(cmdclass={"build_py": BuildPyWithProtos})
