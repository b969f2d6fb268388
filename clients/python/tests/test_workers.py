"""Python and TypeScript workers beside Keel's Rust worker, through the real
servers (see conftest.py). Every check is on what GetJob shows a user."""

import os
import pathlib
import signal
import sys
import time

from google.protobuf import json_format

from conftest import describe, status_name

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def progress(job):
    return json_format.MessageToDict(job.progress)


def ts_example():
    return ["node", str(pathlib.Path(os.environ["KEEL_TS_CLIENT_DIR"]) / "dist" / "examples" / "worker.js")]


def test_python_and_typescript_workers_run_their_kinds_beside_the_rust_worker(keel, procs):
    procs.start("py-example", [sys.executable, str(EXAMPLES / "worker.py")])
    procs.start("ts-example", ts_example())
    text = "Keel keeps jobs durable while workers in any language claim them over gRPC"
    summaries = [keel.create("agent.summarize", {"text": f"{text} {i}"}) for i in range(3)]
    reports = [keel.create("report.render", {"title": f"R{i}", "sections": ["a", "b", "c"][: i + 1]}) for i in range(3)]
    echoes = [keel.create("echo", {"n": i}) for i in range(3)]
    # A retryable failure in TypeScript: attempt 1 throws RetryableError.
    flaky_ts = keel.create("report.render", {"title": "F", "sections": ["x"], "flaky": True}, max_attempts=2)

    for i, job_id in enumerate(summaries):
        job = keel.wait_status(job_id, "SUCCEEDED")
        assert job.output["words"] == len(text.split()) + 1, describe(job)
        assert job.output["summary"] == " ".join(text.split()[:12]), describe(job)
    for i, job_id in enumerate(reports):
        job = keel.wait_status(job_id, "SUCCEEDED")
        assert job.output["pages"] == i + 1 and job.output["title"] == f"R{i}", describe(job)
        assert list(job.output["toc"]) == [f"R{i}: {s}" for s in "abc"[: i + 1]], describe(job)
    for i, job_id in enumerate(echoes):
        job = keel.wait_status(job_id, "SUCCEEDED")
        assert job.output["n"] == i, describe(job)
    job = keel.wait_status(flaky_ts, "SUCCEEDED")
    assert job.attempt == 2 and job.output["attempt"] == 2, describe(job)


def test_typescript_handler_is_cancelled_through_its_heartbeat(keel, procs):
    procs.start("ts-example", ts_example())
    job_id = keel.create("report.render", {"title": "long", "sections": [str(i) for i in range(200)], "page_ms": 100})
    keel.wait(job_id, "progress from the TypeScript handler", lambda j: progress(j).get("rendered", 0) >= 1)
    keel.cancel(job_id)
    job = keel.wait_status(job_id, "CANCELLED")
    assert job.output["partial"] is True, describe(job)


def test_sigterm_on_a_typescript_worker_fails_its_job_back_and_another_completes_it(keel, procs):
    a = procs.start("ts-a", ts_example(), KEEL_WORKER_SHUTDOWN_GRACE_MS="500")
    job_id = keel.create("report.render", {"title": "T", "sections": [str(i) for i in range(30)], "page_ms": 100})
    keel.wait(job_id, "progress from the TypeScript handler", lambda j: progress(j).get("rendered", 0) >= 1)
    a.send_signal(signal.SIGTERM)
    assert procs.wait_exit(a, 15) == 0
    job = keel.get(job_id)
    assert status_name(job) == "QUEUED" and job.attempt == 1 and job.error == "worker shutting down", describe(job)
    procs.start("ts-b", ts_example())
    job = keel.wait_status(job_id, "SUCCEEDED")
    assert job.attempt == 2 and job.output["pages"] == 30, describe(job)


def test_retryable_failure_then_success_and_a_permanent_failure(keel, procs):
    procs.python_app("a")
    flaky = keel.create("py.flaky", {}, max_attempts=2)
    broken = keel.create("py.broken", {}, max_attempts=3)
    job = keel.wait_status(flaky, "SUCCEEDED")
    assert job.attempt == 2 and job.output["attempt"] == 2 and job.output["worker"] == "a", describe(job)
    job = keel.wait_status(broken, "FAILED")
    assert job.attempt == 1, f"a non-retryable error is not retried: {describe(job)}"
    assert "ValueError: this job cannot succeed" in job.error, describe(job)


def test_progress_shows_on_the_job_and_cancellation_reaches_the_handler(keel, procs):
    procs.python_app("a", APP_KINDS="py.hold")
    job_id = keel.create("py.hold", {"n": 1})
    job = keel.wait(job_id, "the handler's progress on GetJob", lambda j: progress(j).get("step") == "holding")
    assert status_name(job) == "RUNNING" and progress(job) == {"worker": "a", "attempt": 1, "step": "holding"}, describe(job)
    keel.cancel(job_id)
    job = keel.wait_status(job_id, "CANCELLED")
    assert job.output["saw_cancel"] is True, f"the handler saw cancel_requested: {describe(job)}"


def test_job_of_a_killed_worker_completes_on_another_after_its_lease(keel, procs):
    a = procs.python_app("a", APP_KINDS="py.kill")
    job_id = keel.create("py.kill", {"hold_on": "a"}, max_attempts=3)
    keel.wait(job_id, "worker a holding the job", lambda j: progress(j).get("worker") == "a")
    a.send_signal(signal.SIGKILL)
    a.wait()
    procs.python_app("b", APP_KINDS="py.kill")
    job = keel.wait_status(job_id, "SUCCEEDED", timeout=30)
    assert job.output["worker"] == "b" and job.attempt == 2, describe(job)


def test_sigterm_fails_the_running_job_back_and_another_worker_completes_it(keel, procs):
    a = procs.python_app("a", APP_KINDS="py.term", APP_GRACE="3")
    held = keel.create("py.term", {"hold_on": "a"}, max_attempts=3)
    quick = keel.create("py.sleep", {"ms": 2000})
    keel.wait(held, "worker a holding the job", lambda j: progress(j).get("worker") == "a")
    keel.wait_status(quick, "RUNNING")
    a.send_signal(signal.SIGTERM)
    assert procs.wait_exit(a, 15) == 0
    # Finished within the grace period: recorded as done by a.
    job = keel.get(quick)
    assert status_name(job) == "SUCCEEDED" and job.output["worker"] == "a", describe(job)
    # Still holding when the grace ended: failed back for a retry.
    job = keel.get(held)
    assert status_name(job) == "QUEUED" and job.attempt == 1 and job.error == "worker shutting down", describe(job)
    procs.python_app("b", APP_KINDS="py.term")
    job = keel.wait_status(held, "SUCCEEDED")
    assert job.output["worker"] == "b" and job.attempt == 2, describe(job)


def test_python_and_typescript_workers_claim_over_tls_trusting_a_ca_file(keel, procs):
    """A jobs replica that serves TLS only (scripts/e2e.sh made its CA): each
    library connects with the CA file, runs its kind, and a worker that does
    not trust that CA runs nothing."""
    url, ca = os.environ["KEEL_JOBS_TLS_URL"], os.environ["KEEL_E2E_CA_FILE"]
    procs.python_app("py-untrusting", KEEL_JOBS_URL=url, APP_KINDS="py.tls")
    procs.python_app("py-tls", KEEL_JOBS_URL=url, APP_CA_FILE=ca)
    procs.start("ts-tls", ts_example(), KEEL_JOBS_URL=url, KEEL_TLS_CA_FILE=ca)
    py_job = keel.create("py.sleep", {"ms": 1})
    ts_job = keel.create("report.render", {"title": "T", "sections": ["tls"]})
    job = keel.wait_status(py_job, "SUCCEEDED")
    assert job.output["worker"] == "py-tls", describe(job)
    job = keel.wait_status(ts_job, "SUCCEEDED")
    assert list(job.output["toc"]) == ["T: tls"], describe(job)
    # The worker without the CA file cannot claim: its calls fail the TLS
    # handshake, and the kind only it serves stays queued.
    untrusted = keel.create("py.tls", {})
    log = procs.tmp / "py-untrusting.log"
    deadline = time.monotonic() + 30
    while "ClaimJobs failed (UNAVAILABLE" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the untrusting worker never reported a failed claim"
        time.sleep(0.1)
    job = keel.get(untrusted)
    assert status_name(job) == "QUEUED", describe(job)

