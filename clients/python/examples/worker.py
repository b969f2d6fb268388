"""An example worker: runs `agent.summarize` jobs.

    pip install ./clients/python
    KEEL_JOBS_URL=127.0.0.1:50052 KEEL_WORKER_TOKEN=... python clients/python/examples/worker.py

Create one as a user (grpcurl, see the repository README):
    {"kind": "agent.summarize", "payload": {"text": "Keel runs jobs for agents ..."}}
"""

import asyncio
import logging
import os

from keel_worker import RetryableError, Worker

worker = Worker(
    os.environ.get("KEEL_JOBS_URL", "127.0.0.1:50052"),
    os.environ["KEEL_WORKER_TOKEN"],
    concurrency=int(os.environ.get("KEEL_WORKER_CONCURRENCY", "8")),
    ca_file=os.environ.get("KEEL_CA_FILE"),  # TLS when set
)


@worker.handler("agent.summarize")
async def summarize(job):
    text = str(job.payload.get("text", ""))
    if job.payload.get("flaky") and job.attempt == 1:
        raise RetryableError("model busy, try again")  # retried while attempts remain
    words = text.split()
    for done in range(0, len(words), 100):
        if job.cancelled.is_set():  # the owner cancelled the job
            break
        job.progress({"words_read": done, "of": len(words)})  # shows on GetJob's Job.progress
        await asyncio.sleep(0)  # a real handler would await a model here
    return {"words": len(words), "summary": " ".join(words[:12]), "attempt": job.attempt}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(worker.run())
