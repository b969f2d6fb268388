"""System tests of the Python and TypeScript worker libraries against real
Keel servers, started by scripts/e2e.sh, which sets KEEL_AUTH_ADDR,
KEEL_JOBS_ADDR, KEEL_WORKER_TOKEN and KEEL_TS_CLIENT_DIR (a built
clients/typescript). Tests act as a user does: create jobs through
JobsService, and judge only what GetJob shows.
"""

import os
import pathlib
import signal
import subprocess
import sys
import time
import uuid

import grpc
import pytest
from google.protobuf import struct_pb2

from keel_worker.pb import auth_pb2, auth_pb2_grpc, jobs_pb2, jobs_pb2_grpc

HERE = pathlib.Path(__file__).resolve().parent
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
NEEDED = ("KEEL_AUTH_ADDR", "KEEL_JOBS_ADDR", "KEEL_WORKER_TOKEN", "KEEL_TS_CLIENT_DIR")


def status_name(job):
    return jobs_pb2.JobStatus.Name(job.status).removeprefix("JOB_STATUS_")


def describe(job):
    return (
        f"job {job.id} kind={job.kind} status={status_name(job)} attempt={job.attempt}/{job.max_attempts} "
        f"error={job.error!r} output={dict(job.output)} progress={dict(job.progress)}"
    )


class Keel:
    """A signed-in user of the jobs service."""

    def __init__(self):
        missing = [v for v in NEEDED if not os.environ.get(v)]
        if missing:
            pytest.fail(f"run these tests through scripts/e2e.sh (missing {', '.join(missing)})")
        self.jobs_addr = os.environ["KEEL_JOBS_ADDR"]
        auth = auth_pb2_grpc.AuthServiceStub(grpc.insecure_channel(os.environ["KEEL_AUTH_ADDR"]))
        email = f"workers-{uuid.uuid4().hex[:10]}@example.com"
        auth.Register(auth_pb2.RegisterRequest(email=email, password="correct horse battery", display_name="W"), timeout=30)
        login = auth.Login(auth_pb2.LoginRequest(email=email, password="correct horse battery"), timeout=30)
        self.md = [("authorization", f"Bearer {login.tokens.access_token}")]
        self.stub = jobs_pb2_grpc.JobsServiceStub(grpc.insecure_channel(self.jobs_addr))

    def create(self, kind, payload=None, max_attempts=0):
        s = struct_pb2.Struct()
        s.update(payload or {})
        req = jobs_pb2.CreateJobRequest(kind=kind, payload=s, max_attempts=max_attempts)
        return self.stub.CreateJob(req, metadata=self.md, timeout=10).job.id

    def get(self, job_id):
        return self.stub.GetJob(jobs_pb2.GetJobRequest(id=job_id), metadata=self.md, timeout=10).job

    def cancel(self, job_id):
        return self.stub.CancelJob(jobs_pb2.CancelJobRequest(id=job_id), metadata=self.md, timeout=10).job

    def wait(self, job_id, what, cond, timeout=20.0):
        """Polls GetJob until cond(job); fails naming `what` and the last
        state after `timeout` seconds, or at once when the job ended without
        meeting it."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if cond(job):
                return job
            if status_name(job) in TERMINAL:
                pytest.fail(f"the job ended while waiting for {what}: {describe(job)}")
            if time.monotonic() > deadline:
                pytest.fail(f"after {timeout:.0f}s, still waiting for {what}: {describe(job)}")
            time.sleep(0.1)

    def wait_status(self, job_id, status, timeout=20.0):
        """Waits for a status; fails at once on another terminal one."""
        return self.wait(job_id, status, lambda job: status_name(job) == status, timeout)


@pytest.fixture(scope="session")
def keel():
    return Keel()


class Procs:
    """Worker processes of one test: killed at its end; their logs are
    printed, so pytest shows them when the test failed."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.procs = []

    def start(self, name, cmd, **env):
        log = open(self.tmp / f"{name}.log", "wb")
        full_env = {
            **os.environ,
            "KEEL_JOBS_URL": os.environ["KEEL_JOBS_ADDR"],
            "APP_NAME": name,
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
        p.name = name
        self.procs.append(p)
        return p

    def python_app(self, name, **env):
        return self.start(name, [sys.executable, str(HERE / "worker_app.py")], **env)

    def wait_exit(self, p, timeout):
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker {p.name} did not exit within {timeout:.0f}s")

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
        for p in self.procs:
            print(f"--- worker {p.name} (exit {p.returncode})")
            print((self.tmp / f"{p.name}.log").read_text(errors="replace")[-6000:])


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    yield p
    p.close()
