// The worker: claims jobs of its kinds from Keel's JobRunnerService, runs
// their handlers with heartbeats, and records each attempt's outcome.
//
// The semantics mirror Keel's Rust worker (services/worker): a heartbeat that
// says `cancelRequested` aborts the handler's signal and the job ends
// CANCELLED; a FAILED_PRECONDITION / NOT_FOUND answer means the attempt is no
// longer ours (lease lost, or settled elsewhere) and nothing more is
// recorded; shutdown stops claiming, lets running handlers finish within a
// grace period, then fails the rest back as retryable.
import * as fs from "node:fs";
import * as os from "node:os";
import { randomUUID } from "node:crypto";
import * as grpc from "@grpc/grpc-js";

import { loadJobs } from "./proto";
import { fromStruct, toStruct, type JsonObject } from "./struct";
import type { ClaimedJob__Output } from "./generated/keel/jobs/v1/ClaimedJob";
import type { ClaimJobsResponse__Output } from "./generated/keel/jobs/v1/ClaimJobsResponse";
import type { HeartbeatRequest } from "./generated/keel/jobs/v1/HeartbeatRequest";
import type { HeartbeatResponse__Output } from "./generated/keel/jobs/v1/HeartbeatResponse";
import type { JobRunnerServiceClient } from "./generated/keel/jobs/v1/JobRunnerService";
import type { Timestamp__Output } from "./generated/google/protobuf/Timestamp";

const KIND_RE = /^[a-z0-9._-]{1,128}$/;
const MAX_KINDS = 64;
const MAX_ERROR_CHARS = 2000;
/** Below this, a progress report waits for the next regular heartbeat. */
const MIN_PROGRESS_INTERVAL_MS = 1000;

/**
 * Thrown by a handler when another attempt may succeed: the attempt fails and
 * the job is retried while attempts remain. Any other error fails the job at once.
 */
export class RetryableError extends Error {
  constructor(message?: string) {
    super(message);
    this.name = "RetryableError";
  }
}

/** The job a handler runs. */
export interface Job {
  id: string;
  kind: string;
  /** This attempt's number, from 1. */
  attempt: number;
  maxAttempts: number;
  priority: number;
  payload: JsonObject;
}

/** What else a handler gets: cancellation and progress reporting. */
export interface JobContext {
  /**
   * Aborted when the handler should stop: the job's owner cancelled it, the
   * attempt's lease was lost, or the worker is shutting down and the grace
   * period is over. `signal.reason` says which. A handler that has not
   * returned `cancelPatienceMs` after that is abandoned.
   */
  signal: AbortSignal;
  /** True once the job's owner asked to cancel it. */
  readonly cancelRequested: boolean;
  /**
   * Reports the attempt's progress (a JSON object). Sent with the next
   * heartbeat (within about a second); it shows on the job's `progress`.
   * Only the latest report is sent.
   */
  progress(progress: JsonObject): void;
  /** When the attempt's lease ends unless heartbeats extend it (they do). */
  readonly leaseExpiresAt: Date | null;
  readonly workerId: string;
}

/** Returns the job's output: an object, or any JSON value (sent as `{value}`). */
export type Handler = (job: Job, ctx: JobContext) => unknown | Promise<unknown>;

export interface Logger {
  info(message: string): void;
  warn(message: string): void;
  error(message: string): void;
}

export interface WorkerOptions {
  /** `host:port`, `http://host:port`, or `https://host:port` (TLS). */
  url: string;
  /** The worker credential (the jobs service's KEEL_WORKER_TOKEN). */
  token: string;
  /** Most jobs run at once. Default 8. */
  concurrency?: number;
  /** Default `ts-<host>-<pid>-<random>`. */
  workerId?: string;
  /** TLS (also implied by `https://` or `caFile`), with the system roots unless `caFile`. */
  tls?: boolean;
  /** PEM of the CA that signed the jobs service's certificate. */
  caFile?: string;
  /** Default 5000; at least three heartbeats per lease in any case. */
  heartbeatIntervalMs?: number;
  /** How long one ClaimJobs call waits for work (0..=30000). Default 10000. */
  claimWaitMs?: number;
  /** On shutdown, how long running handlers get to finish. Default 10000. */
  shutdownGraceMs?: number;
  /** How long a handler gets to return after its signal is aborted. Default 2000. */
  cancelPatienceMs?: number;
  /** Deadline of each unary call besides ClaimJobs' wait. Default 10000. */
  callTimeoutMs?: number;
  /** Stop gracefully on SIGTERM / SIGINT while run() runs. Default true. */
  handleSignals?: boolean;
  /** Default: lines on stderr. */
  logger?: Logger;
  /** Where keel/jobs/v1/jobs.proto is; default the package's copy. */
  protoDir?: string;
}

type Stop = "cancel requested" | "worker shutting down" | "lease lost";

type Result = { ok: true; value: unknown } | { ok: false; error: unknown };

const stderrLogger: Logger = {
  info: (m) => process.stderr.write(`keel-worker: ${m}\n`),
  warn: (m) => process.stderr.write(`keel-worker: warning: ${m}\n`),
  error: (m) => process.stderr.write(`keel-worker: error: ${m}\n`),
};

/** A one-shot wake-up that can be re-armed. */
class Notify {
  private promise!: Promise<void>;
  private resolve!: () => void;
  constructor() {
    this.reset();
  }
  reset(): void {
    this.promise = new Promise((r) => (this.resolve = r));
  }
  notify(): void {
    this.resolve();
  }
  wait(): Promise<void> {
    return this.promise;
  }
}

/** A promise that resolves after `ms`, and a way to drop its timer. */
function timer(ms: number): { done: Promise<void>; clear: () => void } {
  let t: NodeJS.Timeout | undefined;
  const done = new Promise<void>((r) => (t = setTimeout(r, Math.max(0, ms))));
  return { done, clear: () => clearTimeout(t) };
}

/** 100 ms doubling up to 5 s, plus up to a quarter of jitter. */
function backoff(failures: number): number {
  const base = Math.min(100 * 2 ** Math.min(failures, 6), 5000);
  return base + Math.random() * (base / 4);
}

function toDate(ts: Timestamp__Output | null | undefined): Date | null {
  if (!ts) return null;
  return new Date(Number(ts.seconds) * 1000 + Math.floor(ts.nanos / 1e6));
}

function isRefused(e: unknown): boolean {
  const code = (e as grpc.ServiceError)?.code;
  return code === grpc.status.FAILED_PRECONDITION || code === grpc.status.NOT_FOUND;
}

function isRejected(e: unknown): boolean {
  const code = (e as grpc.ServiceError)?.code;
  return code === grpc.status.INVALID_ARGUMENT || code === grpc.status.OUT_OF_RANGE;
}

function describe(e: unknown): string {
  const se = e as grpc.ServiceError;
  if (se && typeof se.code === "number" && se.details !== undefined) return `${grpc.status[se.code]}: ${se.details}`;
  return e instanceof Error ? e.message : String(e);
}

/** One claimed attempt while it runs. */
class Attempt implements JobContext {
  readonly controller = new AbortController();
  readonly wake = new Notify();
  stop: Stop | null = null;
  progressValue: JsonObject | null = null;
  progressSeq = 0;
  leaseExpiresAt: Date | null;
  readonly startedAt: Date | null;

  constructor(readonly job: Job, claimed: ClaimedJob__Output, readonly workerId: string) {
    this.leaseExpiresAt = toDate(claimed.leaseExpiresAt);
    this.startedAt = toDate(claimed.job?.startedAt);
  }

  get signal(): AbortSignal {
    return this.controller.signal;
  }

  get cancelRequested(): boolean {
    return this.stop === "cancel requested";
  }

  progress(progress: JsonObject): void {
    if (typeof progress !== "object" || progress === null || Array.isArray(progress)) {
      throw new TypeError("progress must be an object");
    }
    toStruct(progress); // refuse what cannot be sent, here rather than later
    this.progressValue = progress;
    this.progressSeq += 1;
    this.wake.notify();
  }
}

export class Worker {
  readonly workerId: string;
  private readonly opts: Required<Omit<WorkerOptions, "caFile" | "workerId" | "protoDir">> & { caFile?: string };
  private readonly target: string;
  private readonly tls: boolean;
  private readonly metadata = new grpc.Metadata();
  private readonly handlers = new Map<string, Handler>();
  private readonly running = new Map<string, Promise<void>>();
  private readonly attempts = new Set<Attempt>();
  private readonly slotFree = new Notify();
  private readonly stopped = new Notify();
  private client: JobRunnerServiceClient | null = null;
  private claimCall: grpc.ClientUnaryCall | null = null;
  private stopping = false;
  private hardStop = false;
  private readonly protoDir?: string;

  constructor(options: WorkerOptions) {
    if (!options.token) throw new Error("a worker token is required");
    const m = /^(?:(https?):\/\/)?([^/]+)\/?$/.exec(options.url.trim());
    if (!m) throw new Error(`url ${options.url}: expected host:port, http://host:port or https://host:port`);
    this.target = m[2];
    this.tls = Boolean(options.tls || m[1] === "https" || options.caFile);
    this.opts = {
      url: options.url,
      token: options.token,
      concurrency: options.concurrency ?? 8,
      tls: this.tls,
      caFile: options.caFile,
      heartbeatIntervalMs: options.heartbeatIntervalMs ?? 5000,
      claimWaitMs: options.claimWaitMs ?? 10000,
      shutdownGraceMs: options.shutdownGraceMs ?? 10000,
      cancelPatienceMs: options.cancelPatienceMs ?? 2000,
      callTimeoutMs: options.callTimeoutMs ?? 10000,
      handleSignals: options.handleSignals ?? true,
      logger: options.logger ?? stderrLogger,
    };
    if (this.opts.concurrency < 1) throw new Error("concurrency must be at least 1");
    if (this.opts.claimWaitMs < 0 || this.opts.claimWaitMs > 30000) throw new Error("claimWaitMs must be within 0..=30000");
    this.workerId = options.workerId ?? `ts-${os.hostname()}-${process.pid}-${randomUUID().slice(0, 8)}`;
    if (Buffer.byteLength(this.workerId) < 1 || Buffer.byteLength(this.workerId) > 128) {
      throw new Error("workerId must be 1..=128 bytes");
    }
    this.protoDir = options.protoDir;
    this.metadata.set("authorization", `Bearer ${options.token}`);
  }

  /** Registers the handler of one job kind. */
  handle(kind: string, handler: Handler): this {
    if (!KIND_RE.test(kind)) throw new Error(`job kind "${kind}" must be 1..=128 characters of [a-z0-9._-]`);
    if (this.handlers.has(kind)) throw new Error(`a handler for "${kind}" is already registered`);
    if (this.handlers.size >= MAX_KINDS) throw new Error(`at most ${MAX_KINDS} kinds per worker`);
    this.handlers.set(kind, handler);
    return this;
  }

  /**
   * Begins a graceful shutdown (what SIGTERM does): stop claiming, give running
   * handlers `shutdownGraceMs`, then stop them and fail their attempts back as
   * retryable. A second call skips the rest of the grace period.
   */
  stop(): void {
    if (this.stopping) {
      this.goHard();
      return;
    }
    this.stopping = true;
    this.claimCall?.cancel();
    this.slotFree.notify();
    this.stopped.notify();
  }

  /** Claims and runs jobs until stop() (or SIGTERM / SIGINT); resolves once every claimed job is settled. */
  async run(): Promise<void> {
    if (this.handlers.size === 0) throw new Error("no handlers registered");
    const log = this.opts.logger;
    const Service = loadJobs(this.protoDir).keel.jobs.v1.JobRunnerService;
    const creds = this.tls
      ? grpc.credentials.createSsl(this.opts.caFile ? fs.readFileSync(this.opts.caFile) : undefined)
      : grpc.credentials.createInsecure();
    this.client = new Service(this.target, creds, {
      "grpc.keepalive_time_ms": 30000,
      "grpc.keepalive_timeout_ms": 10000,
      "grpc.keepalive_permit_without_calls": 1,
      "grpc.max_receive_message_length": 64 * 1024 * 1024,
    });
    const onSignal = (sig: NodeJS.Signals) => {
      log.info(`${sig}: stopping`);
      this.stop();
    };
    if (this.opts.handleSignals) {
      process.on("SIGTERM", onSignal);
      process.on("SIGINT", onSignal);
    }
    log.info(`worker ${this.workerId} claiming ${[...this.handlers.keys()].sort().join(", ")} (concurrency ${this.opts.concurrency})`);
    try {
      await this.claimLoop();
      if (this.running.size > 0) {
        log.info(`shutting down: waiting up to ${this.opts.shutdownGraceMs} ms for ${this.running.size} running job(s)`);
        const grace = timer(this.opts.shutdownGraceMs);
        const hard = new Promise<void>((r) => {
          this.onHard = r;
          if (this.hardStop) r();
        });
        await Promise.race([Promise.allSettled([...this.running.values()]), grace.done, hard]);
        grace.clear();
        this.goHard();
        await Promise.allSettled([...this.running.values()]);
      }
    } finally {
      if (this.opts.handleSignals) {
        process.off("SIGTERM", onSignal);
        process.off("SIGINT", onSignal);
      }
      this.client.close();
      log.info(`worker ${this.workerId} stopped`);
    }
  }

  private onHard: (() => void) | null = null;

  private goHard(): void {
    if (this.hardStop) return;
    this.hardStop = true;
    this.onHard?.();
    for (const a of this.attempts) a.wake.notify();
  }

  private unary<Res>(method: string, req: unknown, timeoutMs: number, track?: (c: grpc.ClientUnaryCall) => void): Promise<Res> {
    return new Promise((resolve, reject) => {
      const fn = (this.client as unknown as Record<string, Function>)[method];
      const call = fn.call(this.client, req, this.metadata, { deadline: Date.now() + timeoutMs }, (err: grpc.ServiceError | null, res: Res) =>
        err ? reject(err) : resolve(res),
      );
      track?.(call);
    });
  }

  private async claimLoop(): Promise<void> {
    const kinds = [...this.handlers.keys()].sort();
    let failures = 0;
    while (!this.stopping) {
      const free = this.opts.concurrency - this.running.size;
      if (free <= 0) {
        this.slotFree.reset();
        await this.slotFree.wait();
        continue;
      }
      const wait = { seconds: String(Math.floor(this.opts.claimWaitMs / 1000)), nanos: (this.opts.claimWaitMs % 1000) * 1e6 };
      let res: ClaimJobsResponse__Output;
      try {
        res = await this.unary<ClaimJobsResponse__Output>(
          "ClaimJobs",
          { workerId: this.workerId, kinds, maxJobs: free, wait },
          this.opts.claimWaitMs + this.opts.callTimeoutMs,
          (c) => (this.claimCall = c),
        );
      } catch (e) {
        this.claimCall = null;
        if (this.stopping) break; // our own cancel
        const code = (e as grpc.ServiceError).code;
        if (code === grpc.status.UNIMPLEMENTED) {
          this.opts.logger.error(`the jobs service at ${this.target} lacks ClaimJobs: ${describe(e)}`);
        } else {
          this.opts.logger.warn(`ClaimJobs failed (${describe(e)}); retrying`);
        }
        const t = timer(backoff(failures++));
        await Promise.race([t.done, this.stopped.wait()]);
        t.clear();
        continue;
      }
      this.claimCall = null;
      failures = 0;
      for (const claimed of res.jobs) this.startJob(claimed);
    }
  }

  private startJob(claimed: ClaimedJob__Output): void {
    const j = claimed.job;
    if (!j) return;
    const job: Job = {
      id: j.id,
      kind: j.kind,
      attempt: j.attempt,
      maxAttempts: j.maxAttempts,
      priority: j.priority,
      payload: fromStruct(j.payload),
    };
    this.opts.logger.info(`job ${job.id} (${job.kind}) attempt ${job.attempt} claimed`);
    const attempt = new Attempt(job, claimed, this.workerId);
    this.attempts.add(attempt);
    const p = this.runJob(attempt)
      .catch((e) => this.opts.logger.error(`job ${job.id}: unexpected error in the worker: ${describe(e)}`))
      .finally(() => {
        this.running.delete(job.id);
        this.attempts.delete(attempt);
        this.slotFree.notify();
      });
    this.running.set(job.id, p);
  }

  private async runJob(a: Attempt): Promise<void> {
    const job = a.job;
    if (this.stopping) {
      // Claimed as the worker began to stop: hand it straight back.
      await this.fail(job, "worker shutting down", true);
      return;
    }
    const handler = this.handlers.get(job.kind);
    if (!handler) {
      await this.fail(job, `no handler for job kind "${job.kind}"`, false);
      return;
    }
    let result: Result | null = null;
    const done = (async () => handler(job, a))().then(
      (value) => (result = { ok: true, value }),
      (error) => (result = { ok: false, error }),
    );
    void done.then(() => a.wake.notify());
    result = await this.supervise(a, () => result);
    await this.record(a, result);
  }

  /** Heartbeats until the handler settles (or is abandoned); stops it when asked. */
  private async supervise(a: Attempt, settled: () => Result | null): Promise<Result> {
    const job = a.job;
    const lease = this.leaseMs(a);
    let lastBeat = Date.now();
    let nextBeat = lastBeat + this.beatInterval(lease);
    // The first progress report goes out at once, later ones at most once
    // per MIN_PROGRESS_INTERVAL_MS.
    let progressGate = lastBeat - MIN_PROGRESS_INTERVAL_MS;
    let abortAt: number | null = null;
    let sentSeq = 0;
    for (;;) {
      const r = settled();
      if (r) return r;
      let now = Date.now();
      let due = nextBeat;
      if (a.progressSeq !== sentSeq) due = Math.min(due, progressGate + MIN_PROGRESS_INTERVAL_MS);
      if (abortAt !== null) due = Math.min(due, abortAt);
      a.wake.reset();
      const t = timer(due - now);
      await Promise.race([t.done, a.wake.wait()]);
      t.clear();
      if (settled()) continue;
      now = Date.now();
      if (abortAt !== null && now >= abortAt) {
        this.opts.logger.warn(`job ${job.id}: handler ignored cancellation for ${this.opts.cancelPatienceMs} ms: abandoning it`);
        return { ok: false, error: new Error("handler was abandoned") };
      }
      if (this.hardStop && a.stop === null) {
        this.opts.logger.warn(`job ${job.id}: grace period over: stopping the handler`);
        a.stop = "worker shutting down";
      }
      if (now >= nextBeat || (a.progressSeq !== sentSeq && now >= progressGate + MIN_PROGRESS_INTERVAL_MS)) {
        const seq = a.progressSeq;
        const req: HeartbeatRequest = { id: job.id, attempt: job.attempt, workerId: this.workerId };
        if (seq !== sentSeq && a.progressValue) req.progress = toStruct(a.progressValue);
        try {
          const res = await this.unary<HeartbeatResponse__Output>("Heartbeat", req, this.opts.callTimeoutMs);
          sentSeq = seq;
          a.leaseExpiresAt = toDate(res.leaseExpiresAt) ?? a.leaseExpiresAt;
          if (res.cancelRequested && a.stop === null) {
            this.opts.logger.info(`job ${job.id}: cancellation requested: stopping the handler`);
            a.stop = "cancel requested";
          }
        } catch (e) {
          if (isRefused(e)) {
            if (a.stop === null) {
              this.opts.logger.warn(`job ${job.id}: lease lost: stopping the handler`);
              a.stop = "lease lost";
            }
          } else {
            this.opts.logger.warn(`job ${job.id}: heartbeat failed (${describe(e)})`);
          }
        }
        lastBeat = progressGate = Date.now();
        nextBeat = lastBeat + this.beatInterval(lease);
      }
      if (a.stop !== null && !a.signal.aborted) {
        a.controller.abort(new Error(a.stop));
        abortAt = Date.now() + this.opts.cancelPatienceMs;
      }
    }
  }

  /** The attempt's lease as granted: from its start (server clock) and from now (ours), whichever is shorter. */
  private leaseMs(a: Attempt): number | null {
    if (!a.leaseExpiresAt) return null;
    const spans = [Date.now(), a.startedAt?.getTime()]
      .filter((t): t is number => t !== undefined)
      .map((t) => a.leaseExpiresAt!.getTime() - t)
      .filter((s) => s > 0);
    return spans.length ? Math.min(...spans) : null;
  }

  private beatInterval(lease: number | null): number {
    return lease ? Math.max(100, Math.min(this.opts.heartbeatIntervalMs, lease / 3)) : this.opts.heartbeatIntervalMs;
  }

  private async record(a: Attempt, result: Result): Promise<void> {
    const job = a.job;
    switch (a.stop) {
      case "lease lost":
        return;
      case "worker shutting down":
        return this.fail(job, "worker shutting down", true);
      case "cancel requested":
        return this.complete(job, result.ok ? result.value : {}, true);
    }
    if (result.ok) return this.complete(job, result.value, false);
    const e = result.error;
    if (e instanceof RetryableError) return this.fail(job, e.message || "RetryableError", true);
    this.opts.logger.error(`job ${job.id}: handler threw: ${e instanceof Error ? e.stack : String(e)}`);
    return this.fail(job, e instanceof Error ? `${e.name}: ${e.message}` : String(e), false);
  }

  private async complete(job: Job, value: unknown, cancelled: boolean): Promise<void> {
    let output;
    try {
      const obj =
        value === undefined || value === null
          ? {}
          : typeof value === "object" && !Array.isArray(value)
            ? (value as JsonObject)
            : ({ value } as unknown as JsonObject);
      output = toStruct(obj);
    } catch (e) {
      return this.fail(job, `output is not JSON: ${describe(e)}`, false);
    }
    const req = { id: job.id, attempt: job.attempt, output, cancelled, workerId: this.workerId };
    const err = await this.call("CompleteJob", job, req);
    if (err === null) this.opts.logger.info(`job ${job.id} attempt ${job.attempt} ${cancelled ? "cancelled" : "completed"}`);
    else if (isRejected(err)) await this.fail(job, "output rejected by the jobs service", false);
  }

  private async fail(job: Job, error: string, retryable: boolean): Promise<void> {
    if (error.length > MAX_ERROR_CHARS) error = error.slice(0, MAX_ERROR_CHARS) + "…";
    const req = { id: job.id, attempt: job.attempt, error, retryable, workerId: this.workerId };
    if ((await this.call("FailJob", job, req)) === null) {
      this.opts.logger.info(`job ${job.id} attempt ${job.attempt} failed (retryable=${retryable}): ${error}`);
    }
  }

  /**
   * Sends a transition, retrying transient failures with backoff for up to a
   * minute. null when recorded; else the error (refused: already settled, or
   * the attempt is not ours; nothing to do).
   */
  private async call(method: string, job: Job, req: unknown, giveUpAfterMs = 60000): Promise<unknown> {
    const deadline = Date.now() + giveUpAfterMs;
    for (let failures = 0; ; failures++) {
      try {
        await this.unary(method, req, this.opts.callTimeoutMs);
        return null;
      } catch (e) {
        if (isRefused(e)) {
          this.opts.logger.info(`job ${job.id}: ${method} not recorded: ${describe(e)}`);
          return e;
        }
        if (isRejected(e)) {
          this.opts.logger.error(`job ${job.id}: ${method} rejected: ${describe(e)}`);
          return e;
        }
        const delay = backoff(failures);
        if (Date.now() + delay > deadline) {
          this.opts.logger.error(`job ${job.id}: ${method} failed (${describe(e)}); giving up, the lease will hand it on`);
          return e;
        }
        this.opts.logger.warn(`job ${job.id}: ${method} failed (${describe(e)}); retrying`);
        await timer(delay).done;
      }
    }
  }
}
