"""The generated Keel stubs (messages and service stubs for auth, jobs and
memory), e.g. `from keel_worker.pb import jobs_pb2, jobs_pb2_grpc`.

An installed package carries them (generated while the wheel was built). From
a source checkout they are generated on first import into
$XDG_CACHE_HOME/keel-worker (needs grpcio-tools and the repository's proto/).
"""

from __future__ import annotations

import importlib
import os
import pathlib
import sys

try:
    from keel_worker._gen.keel.auth.v1 import auth_pb2, auth_pb2_grpc
    from keel_worker._gen.keel.jobs.v1 import jobs_pb2, jobs_pb2_grpc
    from keel_worker._gen.keel.memory.v1 import memory_pb2, memory_pb2_grpc
except ImportError:
    from keel_worker import _generate

    _proto_dir = pathlib.Path(os.environ.get("KEEL_PROTO_DIR") or pathlib.Path(__file__).resolve().parents[3] / "proto")
    _key = _generate.fingerprint(_proto_dir)
    _package = f"_keel_worker_gen_{_key}"
    _cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "keel-worker"
    if not (_cache / _package / "keel" / "jobs" / "v1" / "jobs_pb2_grpc.py").exists():
        _tmp = _cache / f"{_package}.tmp{os.getpid()}"
        _generate.generate(_proto_dir, _tmp, _package)
        try:
            _tmp.rename(_cache / _package)
        except OSError:  # another process got there first
            import shutil

            shutil.rmtree(_tmp, ignore_errors=True)
    if str(_cache) not in sys.path:
        sys.path.append(str(_cache))
    auth_pb2 = importlib.import_module(f"{_package}.keel.auth.v1.auth_pb2")
    auth_pb2_grpc = importlib.import_module(f"{_package}.keel.auth.v1.auth_pb2_grpc")
    jobs_pb2 = importlib.import_module(f"{_package}.keel.jobs.v1.jobs_pb2")
    jobs_pb2_grpc = importlib.import_module(f"{_package}.keel.jobs.v1.jobs_pb2_grpc")
    memory_pb2 = importlib.import_module(f"{_package}.keel.memory.v1.memory_pb2")
    memory_pb2_grpc = importlib.import_module(f"{_package}.keel.memory.v1.memory_pb2_grpc")

__all__ = ["auth_pb2", "auth_pb2_grpc", "jobs_pb2", "jobs_pb2_grpc", "memory_pb2", "memory_pb2_grpc"]
