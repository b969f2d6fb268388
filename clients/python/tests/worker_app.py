"""A worker for the system tests. Environment: KEEL_JOBS_URL (https://: TLS,
trusting APP_CA_FILE when set),
KEEL_WORKER_TOKEN, APP_NAME (put in outputs and progress, so a test sees
which worker ran a job), APP_KINDS (comma-separated kinds of the `hold`
handler), APP_GRACE (shutdown grace, seconds).

Kinds:
  py.flaky   RetryableError on attempt 1, then succeeds
  py.broken  raises ValueError (not retryable)
  py.sleep   sleeps payload.ms, then succeeds
  APP_KINDS  `hold`: reports progress, then waits until cancelled (or
             payload.hold_on names another worker: then succeeds at once)
"""

import asyncio
import logging
import os

from keel_worker import RetryableError, Worker

name = os.environ["APP_NAME"]
worker = Worker(
    os.environ["KEEL_JOBS_URL"],
    os.environ["KEEL_WORKER_TOKEN"],
    concurrency=4,
    worker_id=f"test-{name}-{os.getpid()}",
    claim_wait=2.0,
    shutdown_grace=float(os.environ.get("APP_GRACE", "2")),
    cancel_patience=1.0,
    ca_file=os.environ.get("APP_CA_FILE") or None,
)


@worker.handler("py.flaky")
async def flaky(job):
    if job.attempt == 1:
        raise RetryableError("first attempt fails")
    return {"worker": name, "attempt": job.attempt}


@worker.handler("py.broken")
async def broken(job):
    raise ValueError("this job cannot succeed")


@worker.handler("py.sleep")
async def sleep(job):
    await asyncio.sleep(job.payload["ms"] / 1000)
    return {"worker": name, "attempt": job.attempt, "slept_ms": job.payload["ms"]}


async def hold(job):
    job.progress({"worker": name, "attempt": job.attempt, "step": "holding"})
    if job.payload.get("hold_on", name) != name:
        return {"worker": name, "attempt": job.attempt}
    await job.cancelled.wait()
    return {"worker": name, "attempt": job.attempt, "saw_cancel": job.cancel_requested}


for kind in filter(None, os.environ.get("APP_KINDS", "").split(",")):
    worker.add_handler(kind, hold)

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    asyncio.run(worker.run())
