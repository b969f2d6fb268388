"""The asyncio worker: claims jobs of its kinds from Keel's JobRunnerService,
runs their handlers with heartbeats, and records each attempt's outcome.

The semantics mirror Keel's Rust worker (services/worker): a heartbeat that
says `cancel_requested` cancels the handler and the job ends CANCELLED; a
FAILED_PRECONDITION / NOT_FOUND answer means the attempt is no longer ours
(lease lost, or settled elsewhere) and nothing more is recorded; shutdown
stops claiming, lets running handlers finish within a grace period, then
fails the rest back as retryable.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import enum
import logging
import math
import os
import random
import re
import signal
import socket
import time
import uuid
from typing import Any, Awaitable, Callable, Dict, Optional

import grpc
from google.protobuf import duration_pb2, json_format, struct_pb2

from keel_worker.pb import jobs_pb2, jobs_pb2_grpc

log = logging.getLogger("keel_worker")

KIND_RE = re.compile(r"^[a-z0-9._-]{1,128}$")
MAX_KINDS = 64
MAX_ERROR_CHARS = 2000
# Below this, a progress report waits for the next regular heartbeat.
MIN_PROGRESS_INTERVAL = 1.0


class RetryableError(Exception):
    """Raised by a handler when another attempt may succeed: the attempt
    fails and the job is retried while attempts remain. Any other exception
    fails the job at once."""


_LOST = object()


class _Stop(enum.Enum):
    CANCEL_REQUESTED = "cancel requested"
    SHUTDOWN = "worker shutting down"
    LEASE_LOST = "lease lost"


class Job:
    """What a handler gets: the job, its attempt, progress reporting and the
    cancellation signal."""

    def __init__(self, claimed: Any) -> None:
        job = claimed.job
        self.id: str = job.id
        self.kind: str = job.kind
        #: This attempt's number, from 1.
        self.attempt: int = job.attempt
        self.max_attempts: int = job.max_attempts
        self.priority: int = job.priority
        #: The job's payload as plain JSON values (whole numbers as int).
        self.payload: Dict[str, Any] = _from_struct(job.payload) if job.HasField("payload") else {}
        #: Set when the handler should stop: the job's owner cancelled it, the
        #: attempt's lease was lost, or the worker is shutting down and the
        #: grace period is over. A handler that does not return within the
        #: worker's `cancel_patience` seconds after that is cancelled
        #: (asyncio.CancelledError at its next await).
        self.cancelled: asyncio.Event = asyncio.Event()
        self._stop: Optional[_Stop] = None
        self._progress: Optional[Dict[str, Any]] = None
        self._progress_seq = 0
        self._wake = asyncio.Event()
        self._started_at = job.started_at.ToDatetime(_dt.timezone.utc) if job.HasField("started_at") else None
        self.lease_expires_at: Optional[_dt.datetime] = (
            claimed.lease_expires_at.ToDatetime(_dt.timezone.utc) if claimed.HasField("lease_expires_at") else None
        )

    @property
    def cancel_requested(self) -> bool:
        """True once the job's owner asked to cancel it."""
        return self._stop is _Stop.CANCEL_REQUESTED

    def progress(self, progress: Dict[str, Any]) -> None:
        """Reports the attempt's progress (a JSON object). Sent with the next
        heartbeat (within about a second); it shows on the job's `progress`.
        Only the latest report is sent."""
        if not isinstance(progress, dict):
            raise TypeError("progress must be a dict")
        _to_struct(progress)  # refuse what cannot be sent, here rather than later
        self._progress = progress
        self._progress_seq += 1
        self._wake.set()

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, kind={self.kind!r}, attempt={self.attempt})"


Handler = Callable[[Job], Awaitable[Any]]


class Worker:
    """Runs Keel jobs of the kinds it has handlers for.

    >>> worker = Worker("127.0.0.1:50052", token, concurrency=8)
    >>> @worker.handler("agent.summarize")
    ... async def summarize(job):
    ...     return {"summary": job.payload["text"][:100]}
    >>> await worker.run()

    `url` is `host:port`, `http://host:port`, or `https://host:port` (TLS;
    also with `tls=True` or a `ca_file`, the PEM of the CA that signed the
    server's certificate, else the system roots).
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        concurrency: int = 8,
        worker_id: Optional[str] = None,
        tls: bool = False,
        ca_file: Optional[str] = None,
        heartbeat_interval: float = 5.0,
        claim_wait: float = 10.0,
        shutdown_grace: float = 10.0,
        cancel_patience: float = 2.0,
        call_timeout: float = 10.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if not token:
            raise ValueError("a worker token is required")
        if not 0 <= claim_wait <= 30:
            raise ValueError("claim_wait must be within 0..=30 seconds")
        self._target, url_tls = _parse_url(url)
        self._tls = tls or url_tls or ca_file is not None
        self._ca_file = ca_file
        self._metadata = (("authorization", f"Bearer {token}"),)
        self.concurrency = concurrency
        self.worker_id = worker_id or f"py-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if not 1 <= len(self.worker_id.encode()) <= 128:
            raise ValueError("worker_id must be 1..=128 bytes")
        self.heartbeat_interval = heartbeat_interval
        self.claim_wait = claim_wait
        self.shutdown_grace = shutdown_grace
        self.cancel_patience = cancel_patience
        self.call_timeout = call_timeout
        self._handlers: Dict[str, Handler] = {}
        self._running: Dict[str, asyncio.Task] = {}
        self._stopping: Optional[asyncio.Event] = None
        self._hard_stop: Optional[asyncio.Event] = None
        self._slot_free: Optional[asyncio.Event] = None
        self._stub: Any = None

    # -- registration ---------------------------------------------------

    def handler(self, kind: str) -> Callable[[Handler], Handler]:
        """Decorator: `@worker.handler("kind")` on an `async def f(job)`."""

        def register(fn: Handler) -> Handler:
            self.add_handler(kind, fn)
            return fn

        return register

    def add_handler(self, kind: str, fn: Handler) -> None:
        if not KIND_RE.match(kind):
            raise ValueError(f"job kind {kind!r} must be 1..=128 characters of [a-z0-9._-]")
        if kind in self._handlers:
            raise ValueError(f"a handler for {kind!r} is already registered")
        if len(self._handlers) >= MAX_KINDS:
            raise ValueError(f"at most {MAX_KINDS} kinds per worker")
        if not asyncio.iscoroutinefunction(fn):
            raise TypeError(f"the handler for {kind!r} must be an async function")
        self._handlers[kind] = fn

    # -- lifecycle ------------------------------------------------------

    def stop(self) -> None:
        """Begins a graceful shutdown (what SIGTERM does): stop claiming, give
        running handlers `shutdown_grace` seconds, then stop them and fail
        their attempts back as retryable. A second call skips the rest of
        the grace period."""
        if self._stopping is None:
            return
        if self._stopping.is_set():
            self._hard_stop.set()
        self._stopping.set()

    async def run(self, *, install_signal_handlers: bool = True) -> None:
        """Claims and runs jobs until stop() (or SIGTERM / SIGINT, unless
        `install_signal_handlers` is false); returns once every claimed job
        is settled."""
        if not self._handlers:
            raise RuntimeError("no handlers registered")
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._hard_stop = asyncio.Event()
        self._slot_free = asyncio.Event()
        installed = []
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.add_signal_handler(sig, self._on_signal, sig)
                    installed.append(sig)
                except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
                    pass
        channel = self._channel()
        self._stub = jobs_pb2_grpc.JobRunnerServiceStub(channel)
        log.info("worker %s claiming %s (concurrency %d)", self.worker_id, sorted(self._handlers), self.concurrency)
        try:
            await self._claim_loop()
            if self._running:
                log.info("shutting down: waiting up to %.1fs for %d running job(s)", self.shutdown_grace, len(self._running))
                hard = asyncio.ensure_future(self._hard_stop.wait())
                finished = asyncio.ensure_future(asyncio.wait(list(self._running.values())))
                await asyncio.wait([hard, finished], timeout=self.shutdown_grace, return_when=asyncio.FIRST_COMPLETED)
                hard.cancel()
                finished.cancel()
                self._hard_stop.set()
                if self._running:
                    await asyncio.wait(list(self._running.values()))
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            self._hard_stop.set()
            for task in list(self._running.values()):
                task.cancel()
            if self._running:
                await asyncio.wait(list(self._running.values()))
            await channel.close()
            log.info("worker %s stopped", self.worker_id)

    def _on_signal(self, sig: int) -> None:
        log.info("%s: stopping", signal.Signals(sig).name)
        self.stop()

    def _channel(self) -> grpc.aio.Channel:
        options = [
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ]
        if self._tls:
            root = None
            if self._ca_file:
                with open(self._ca_file, "rb") as f:
                    root = f.read()
            return grpc.aio.secure_channel(self._target, grpc.ssl_channel_credentials(root_certificates=root), options)
        return grpc.aio.insecure_channel(self._target, options)

    # -- claiming -------------------------------------------------------

    async def _claim_loop(self) -> None:
        kinds = sorted(self._handlers)
        failures = 0
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                free = self.concurrency - len(self._running)
                if free <= 0:
                    self._slot_free.clear()
                    slot = asyncio.ensure_future(self._slot_free.wait())
                    await asyncio.wait([slot, stopping], return_when=asyncio.FIRST_COMPLETED)
                    slot.cancel()
                    continue
                wait = duration_pb2.Duration()
                wait.FromMilliseconds(int(self.claim_wait * 1000))
                req = jobs_pb2.ClaimJobsRequest(worker_id=self.worker_id, kinds=kinds, max_jobs=free, wait=wait)
                call = self._stub.ClaimJobs(req, metadata=self._metadata, timeout=self.claim_wait + self.call_timeout)
                claim = asyncio.ensure_future(call)
                await asyncio.wait([claim, stopping], return_when=asyncio.FIRST_COMPLETED)
                if not claim.done():
                    # Shutting down. A claim the server made as the call
                    # ends costs that job one lease at most.
                    call.cancel()
                    try:
                        await claim
                    except (asyncio.CancelledError, grpc.aio.AioRpcError):
                        pass
                    else:
                        self._start_all(claim.result().jobs)
                    break
                try:
                    response = claim.result()
                except asyncio.CancelledError:
                    break
                except grpc.aio.AioRpcError as e:
                    if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                        log.error("the jobs service at %s lacks ClaimJobs: %s", self._target, e.details())
                    else:
                        log.warning("ClaimJobs failed (%s: %s); retrying", e.code().name, e.details())
                    await _sleep_or(self._stopping, _backoff(failures))
                    failures += 1
                    continue
                failures = 0
                self._start_all(response.jobs)
        finally:
            stopping.cancel()

    def _start_all(self, claimed_jobs: Any) -> None:
        for claimed in claimed_jobs:
            job = Job(claimed)
            log.info("job %s (%s) attempt %d claimed", job.id, job.kind, job.attempt)
            task = asyncio.ensure_future(self._run_job(job))
            self._running[job.id] = task

            def done(_t: asyncio.Task, job_id: str = job.id) -> None:
                self._running.pop(job_id, None)
                self._slot_free.set()

            task.add_done_callback(done)

    # -- one attempt ----------------------------------------------------

    async def _run_job(self, job: Job) -> None:
        try:
            if self._stopping.is_set():
                # Claimed as the worker began to stop: hand it straight back.
                await self._fail(job, _Stop.SHUTDOWN.value, True)
                return
            handler = self._handlers.get(job.kind)
            if handler is None:  # the server returned a kind we did not ask for
                await self._fail(job, f'no handler for job kind "{job.kind}"', False)
                return
            task = asyncio.ensure_future(handler(job))
            try:
                await self._supervise(job, task)
            finally:
                if not task.done():  # only when this task itself is cancelled
                    task.cancel()
            await self._record(job, task)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not take the worker down
            log.exception("job %s: unexpected error in the worker", job.id)

    async def _supervise(self, job: Job, task: asyncio.Task) -> None:
        """Heartbeats until the handler task ends; stops it when asked."""
        hard_stop = asyncio.ensure_future(self._hard_stop.wait())
        lease = self._lease_seconds(job)
        last_beat = time.monotonic()
        next_beat = last_beat + self._beat_interval(lease)
        # The first progress report goes out at once, later ones at most
        # once per MIN_PROGRESS_INTERVAL.
        progress_gate = last_beat - MIN_PROGRESS_INTERVAL
        abort_at: Optional[float] = None
        sent_seq = 0
        try:
            while not task.done():
                now = time.monotonic()
                due = next_beat
                if job._progress_seq != sent_seq:
                    due = min(due, progress_gate + MIN_PROGRESS_INTERVAL)
                if abort_at is not None:
                    due = min(due, abort_at)
                job._wake.clear()
                wake = asyncio.ensure_future(job._wake.wait())
                waiters = [task, wake] + ([] if hard_stop.done() else [hard_stop])
                await asyncio.wait(waiters, timeout=max(0.0, due - now), return_when=asyncio.FIRST_COMPLETED)
                wake.cancel()
                if task.done():
                    break
                now = time.monotonic()
                if abort_at is not None and now >= abort_at:
                    log.warning("job %s: handler ignored cancellation for %.1fs: cancelling its task", job.id, self.cancel_patience)
                    task.cancel()
                    abort_at = math.inf
                if hard_stop.done() and job._stop is None:
                    log.warning("job %s: grace period over: stopping the handler", job.id)
                    job._stop = _Stop.SHUTDOWN
                if now >= next_beat or (job._progress_seq != sent_seq and now >= progress_gate + MIN_PROGRESS_INTERVAL):
                    seq = job._progress_seq
                    beat = await self._heartbeat(job, send_progress=seq != sent_seq)
                    last_beat = progress_gate = time.monotonic()
                    if beat is _LOST:
                        if job._stop is None:
                            log.warning("job %s: lease lost: stopping the handler", job.id)
                            job._stop = _Stop.LEASE_LOST
                    elif beat is not None:
                        sent_seq = seq
                        cancel_requested, lease_expires_at = beat
                        if lease_expires_at is not None:
                            job.lease_expires_at = lease_expires_at
                        if cancel_requested and job._stop is None:
                            log.info("job %s: cancellation requested: stopping the handler", job.id)
                            job._stop = _Stop.CANCEL_REQUESTED
                    next_beat = last_beat + self._beat_interval(lease)
                if job._stop is not None and not job.cancelled.is_set():
                    job.cancelled.set()
                    abort_at = time.monotonic() + self.cancel_patience
        finally:
            hard_stop.cancel()

    def _lease_seconds(self, job: Job) -> Optional[float]:
        """The attempt's lease as the server granted it: from its start
        (server clock) and from now (ours), whichever is shorter."""
        if job.lease_expires_at is None:
            return None
        ends = [_dt.datetime.now(_dt.timezone.utc)]
        if job._started_at is not None:
            ends.append(job._started_at)
        spans = [(job.lease_expires_at - t).total_seconds() for t in ends]
        spans = [s for s in spans if s > 0]
        return min(spans) if spans else None

    def _beat_interval(self, lease: Optional[float]) -> float:
        """The configured interval, but at least three beats per lease."""
        if lease:
            return max(0.1, min(self.heartbeat_interval, lease / 3))
        return self.heartbeat_interval

    async def _heartbeat(self, job: Job, send_progress: bool):
        """One heartbeat: (cancel_requested, lease_expires_at); _LOST when the
        attempt is no longer ours; None when it failed otherwise (logged, and
        tried again at the next beat)."""
        req = jobs_pb2.HeartbeatRequest(id=job.id, attempt=job.attempt, worker_id=self.worker_id)
        if send_progress and job._progress is not None:
            req.progress.CopyFrom(_to_struct(job._progress))
        try:
            r = await self._stub.Heartbeat(req, metadata=self._metadata, timeout=self.call_timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                return _LOST
            else:
                log.warning("job %s: heartbeat failed (%s: %s)", job.id, e.code().name, e.details())
            return None
        lease = r.lease_expires_at.ToDatetime(_dt.timezone.utc) if r.HasField("lease_expires_at") else None
        return r.cancel_requested, lease

    async def _record(self, job: Job, task: asyncio.Task) -> None:
        stop = job._stop
        if stop is _Stop.LEASE_LOST:
            return
        if stop is _Stop.SHUTDOWN:
            await self._fail(job, _Stop.SHUTDOWN.value, True)
            return
        output: Any = {}
        error: Optional[BaseException] = None
        if task.cancelled():
            error = asyncio.CancelledError()
        elif task.exception() is not None:
            error = task.exception()
        else:
            output = task.result()
        if stop is _Stop.CANCEL_REQUESTED:
            await self._complete(job, output if error is None else {}, cancelled=True)
            return
        if error is None:
            await self._complete(job, output, cancelled=False)
        elif isinstance(error, RetryableError):
            await self._fail(job, str(error) or type(error).__name__, True)
        elif isinstance(error, asyncio.CancelledError):
            await self._fail(job, "handler was cancelled", True)
        else:
            log.error("job %s: handler raised", job.id, exc_info=error)
            await self._fail(job, f"{type(error).__name__}: {error}", False)

    async def _complete(self, job: Job, output: Any, cancelled: bool) -> None:
        try:
            if output is None:
                output = {}
            elif not isinstance(output, dict):
                output = {"value": output}
            out = _to_struct(output)
        except Exception as e:  # not JSON: retrying would produce it again
            await self._fail(job, f"output is not JSON: {e}", False)
            return
        req = jobs_pb2.CompleteJobRequest(id=job.id, attempt=job.attempt, output=out, cancelled=cancelled, worker_id=self.worker_id)
        code = await self._call("CompleteJob", job, req)
        if code is None:
            log.info("job %s attempt %d %s", job.id, job.attempt, "cancelled" if cancelled else "completed")
        elif code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
            await self._fail(job, "output rejected by the jobs service", False)

    async def _fail(self, job: Job, error: str, retryable: bool) -> None:
        if len(error) > MAX_ERROR_CHARS:
            error = error[:MAX_ERROR_CHARS] + "…"
        req = jobs_pb2.FailJobRequest(id=job.id, attempt=job.attempt, error=error, retryable=retryable, worker_id=self.worker_id)
        if await self._call("FailJob", job, req) is None:
            log.info("job %s attempt %d failed (retryable=%s): %s", job.id, job.attempt, retryable, error)

    async def _call(self, method: str, job: Job, req: Any, give_up_after: float = 60.0) -> Optional[grpc.StatusCode]:
        """Sends a transition, retrying transient failures with backoff for up
        to `give_up_after` seconds. None when recorded; else the refusing
        code (FAILED_PRECONDITION / NOT_FOUND: already settled, or the
        attempt is not ours; nothing to do)."""
        deadline = time.monotonic() + give_up_after
        failures = 0
        while True:
            try:
                await getattr(self._stub, method)(req, metadata=self._metadata, timeout=self.call_timeout)
                return None
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                    log.info("job %s: %s not recorded: %s", job.id, method, e.details())
                    return code
                if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
                    log.error("job %s: %s rejected: %s", job.id, method, e.details())
                    return code
                delay = _backoff(failures)
                if time.monotonic() + delay > deadline:
                    log.error("job %s: %s failed (%s: %s); giving up, the lease will hand it on", job.id, method, code.name, e.details())
                    return code
                log.warning("job %s: %s failed (%s: %s); retrying", job.id, method, code.name, e.details())
                await asyncio.sleep(delay)
                failures += 1


def _parse_url(url: str):
    m = re.match(r"^(?:(https?)://)?([^/]+)/?$", url.strip())
    if not m:
        raise ValueError(f"url {url!r}: expected host:port, http://host:port or https://host:port")
    return m.group(2), m.group(1) == "https"


def _backoff(failures: int) -> float:
    """100 ms doubling up to 5 s, plus up to a quarter of jitter."""
    base = min(0.1 * (2 ** min(failures, 6)), 5.0)
    return base + random.uniform(0, base / 4)


async def _sleep_or(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except asyncio.TimeoutError:
        pass


def _to_struct(d: Dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s


def _from_struct(s: struct_pb2.Struct) -> Dict[str, Any]:
    return _ints(json_format.MessageToDict(s))


def _ints(v: Any) -> Any:
    """Struct numbers are doubles: whole ones come back as int."""
    if isinstance(v, float) and v.is_integer() and abs(v) <= 2**53:
        return int(v)
    if isinstance(v, dict):
        return {k: _ints(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_ints(x) for x in v]
    return v
