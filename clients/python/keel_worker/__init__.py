"""Run Keel jobs from Python.

    from keel_worker import Worker

    worker = Worker("127.0.0.1:50052", token, concurrency=8)

    @worker.handler("agent.summarize")
    async def summarize(job):
        job.progress({"step": "reading"})
        return {"summary": job.payload["text"][:100]}

    asyncio.run(worker.run())
"""

from keel_worker.worker import Job, RetryableError, Worker

__all__ = ["Job", "RetryableError", "Worker"]
__version__ = "0.1.0"
