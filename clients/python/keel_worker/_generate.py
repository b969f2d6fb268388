"""Generates Python gRPC stubs from Keel's .proto files with grpcio-tools.

Used by the wheel build (setup.py) and, when the package runs from a source
checkout without having been built, by keel_worker.pb on first import (into a
cache directory). Generated modules import each other as `keel.jobs.v1...`;
they are rewritten to live under the given package instead, so they cannot
clash with other code's own `keel` stubs.
"""

from __future__ import annotations

import hashlib
import pathlib
import re


def proto_files(proto_dir: pathlib.Path) -> list[pathlib.Path]:
    files = sorted(proto_dir.glob("keel/*/v1/*.proto"))
    if not files:
        raise FileNotFoundError(
            f"no Keel .proto files under {proto_dir} (expected keel/*/v1/*.proto); "
            "build from the Keel repository or set KEEL_PROTO_DIR"
        )
    return files


def fingerprint(proto_dir: pathlib.Path) -> str:
    h = hashlib.sha256()
    for f in proto_files(proto_dir):
        h.update(str(f.relative_to(proto_dir)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def generate(proto_dir: pathlib.Path, out_dir: pathlib.Path, package: str = "keel_worker._gen") -> None:
    """Writes the stubs for every keel/*/v1/*.proto into out_dir, a package named `package`."""
    import grpc_tools
    from grpc_tools import protoc

    proto_dir = pathlib.Path(proto_dir).resolve()
    files = proto_files(proto_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(f.relative_to(proto_dir)) for f in files],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"grpc_tools.protoc failed on {proto_dir}")

    pattern = re.compile(r"^(from|import) keel\.", re.MULTILINE)
    for path in out_dir.rglob("*.py*"):
        if path.suffix in (".py", ".pyi"):
            text = path.read_text()
            path.write_text(pattern.sub(rf"\1 {package}.keel.", text))
    for d in [out_dir, *[p for p in out_dir.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
