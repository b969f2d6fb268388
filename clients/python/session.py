"""A real Keel session from Python, with stubs generated from proto/ by
grpcio-tools at test time. Usage: session.py AUTH_ADDR JOBS_ADDR MEMORY_ADDR
"""

import sys
import uuid

import grpc
from google.protobuf import struct_pb2

from keel.auth.v1 import auth_pb2, auth_pb2_grpc
from keel.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from keel.memory.v1 import memory_pb2, memory_pb2_grpc

checks = 0


def check(cond, what):
    global checks
    if not cond:
        raise SystemExit(f"python session FAILED: {what}")
    checks += 1


def expect_error(code, fn, what):
    try:
        fn()
    except grpc.RpcError as e:
        check(e.code() == code, f"{what}: got {e.code()} {e.details()}")
        return
    check(False, f"{what}: no error")


def struct(d):
    s = struct_pb2.Struct()
    s.update(d)
    return s


def watch_until(jobs, md, job_id, statuses):
    """Follows WatchJob until the job reaches one of `statuses`; returns the last job."""
    last = None
    for update in jobs.WatchJob(jobs_pb2.WatchJobRequest(id=job_id), metadata=md, timeout=60):
        last = update.job
        if last.status in statuses:
            return last
    return last


def main(auth_addr, jobs_addr, memory_addr):
    auth = auth_pb2_grpc.AuthServiceStub(grpc.insecure_channel(auth_addr))
    jobs = jobs_pb2_grpc.JobsServiceStub(grpc.insecure_channel(jobs_addr))
    memory = memory_pb2_grpc.MemoryServiceStub(grpc.insecure_channel(memory_addr))

    email = f"py-{uuid.uuid4().hex[:10]}@example.com"
    reg = auth.Register(
        auth_pb2.RegisterRequest(email=f"  {email.upper()} ", password="correct horse battery", display_name="Py"),
        timeout=30,
    )
    check(reg.user.email == email, f"email normalised: {reg.user.email}")
    login = auth.Login(auth_pb2.LoginRequest(email=email, password="correct horse battery"), timeout=30)
    check(login.user.id == reg.user.id, "login finds the registered user")
    md = [("authorization", f"Bearer {login.tokens.access_token}")]
    me = auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=md, timeout=10)
    check(me.user.id == reg.user.id, "GetCurrentUser")

    put = memory.PutMemory(
        memory_pb2.PutMemoryRequest(
            key="notes/python", content="Python clients speak gRPC fluently", tags=["python"], metadata=struct({"lang": "py"})
        ),
        metadata=md,
        timeout=10,
    )
    check(put.created and put.memory.version == 1, "memory created at version 1")
    put = memory.PutMemory(
        memory_pb2.PutMemoryRequest(key="notes/python", content="Python clients speak gRPC well", tags=["python"], expected_version=1),
        metadata=md,
        timeout=10,
    )
    check(not put.created and put.memory.version == 2, "memory updated to version 2")
    found = memory.SearchMemories(memory_pb2.SearchMemoriesRequest(query="python grpc"), metadata=md, timeout=10)
    check([r.memory.key for r in found.results] == ["notes/python"], f"search: {found}")
    ws = memory.GetWorkspace(memory_pb2.GetWorkspaceRequest(), metadata=md, timeout=10).workspace
    check(ws.memory_count == 1 and ws.tag_counts["python"] == 1, f"workspace: {ws}")

    echo = jobs.CreateJob(jobs_pb2.CreateJobRequest(kind="echo", payload=struct({"n": 1})), metadata=md, timeout=10).job
    done = watch_until(jobs, md, echo.id, {jobs_pb2.JOB_STATUS_SUCCEEDED, jobs_pb2.JOB_STATUS_FAILED})
    check(done.status == jobs_pb2.JOB_STATUS_SUCCEEDED, f"echo job succeeded: {done}")
    got = jobs.GetJob(jobs_pb2.GetJobRequest(id=echo.id), metadata=md, timeout=10).job
    check(got.status == jobs_pb2.JOB_STATUS_SUCCEEDED and got.output["n"] == 1, f"echo output: {got}")

    sleeper = jobs.CreateJob(
        jobs_pb2.CreateJobRequest(kind="sleep", payload=struct({"ms": 60000})), metadata=md, timeout=10
    ).job
    running = watch_until(jobs, md, sleeper.id, {jobs_pb2.JOB_STATUS_RUNNING})
    check(running.status == jobs_pb2.JOB_STATUS_RUNNING, "sleep job started")
    jobs.CancelJob(jobs_pb2.CancelJobRequest(id=sleeper.id), metadata=md, timeout=10)
    ended = watch_until(jobs, md, sleeper.id, {jobs_pb2.JOB_STATUS_CANCELLED, jobs_pb2.JOB_STATUS_SUCCEEDED, jobs_pb2.JOB_STATUS_FAILED})
    check(ended.status == jobs_pb2.JOB_STATUS_CANCELLED, f"sleep job cancelled: {ended}")

    expect_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: jobs.GetJob(jobs_pb2.GetJobRequest(id="nope"), metadata=md, timeout=10), "bad id")
    expect_error(grpc.StatusCode.UNAUTHENTICATED, lambda: jobs.GetJob(jobs_pb2.GetJobRequest(id=echo.id), timeout=10), "no token")
    print(f"python session: {checks} passed, 0 failed")


if __name__ == "__main__":
    main(*sys.argv[1:4])
