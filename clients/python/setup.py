"""Build hook: generates the gRPC stubs from Keel's .proto files into the
wheel (keel_worker/_gen), so the installed package needs no grpcio-tools and
nothing generated is kept in the repository.

The .proto files are taken from $KEEL_PROTO_DIR, else ../../proto (this
directory's place in the Keel repository).
"""

import os
import pathlib

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = pathlib.Path(__file__).resolve().parent


class build_py_with_stubs(build_py):
    def run(self):
        super().run()
        # Imported here: only the build needs the generator.
        import sys

        sys.path.insert(0, str(HERE))
        from keel_worker._generate import generate

        proto_dir = pathlib.Path(os.environ.get("KEEL_PROTO_DIR") or HERE.parent.parent / "proto")
        generate(proto_dir, pathlib.Path(self.build_lib) / "keel_worker" / "_gen")


setup(cmdclass={"build_py": build_py_with_stubs})
