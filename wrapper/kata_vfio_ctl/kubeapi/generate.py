"""Generate the Python modules of the kubelet APIs (deviceplugin.proto, podresources.proto)
with grpcio-tools' protoc. Run by the build (setup.py's build_py) into the built package
and by `make venv` into the source tree; the generated files are never committed.

    python3 wrapper/kata_vfio_ctl/kubeapi/generate.py [OUTPUT_ROOT]

OUTPUT_ROOT is the directory that holds kata_vfio_ctl/ (default: this source tree's).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE_ROOT = HERE.parent.parent  # the directory holding kata_vfio_ctl/
PROTOS = ("deviceplugin.proto", "podresources.proto")


def generate(output_root: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc  # build-time only: grpcio-tools

    includes = Path(grpc_tools.__file__).parent / "_proto"
    for name in PROTOS:
        proto = f"kata_vfio_ctl/kubeapi/{name}"
        code = protoc.main(
            [
                "protoc",
                f"-I{SOURCE_ROOT}",
                f"-I{includes}",
                f"--python_out={output_root}",
                f"--pyi_out={output_root}",
                f"--grpc_python_out={output_root}",
                proto,
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed on {proto} (exit {code})")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else SOURCE_ROOT)
