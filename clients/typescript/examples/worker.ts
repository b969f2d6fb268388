// An example worker: runs `report.render` jobs.
//
//   KEEL_JOBS_URL=127.0.0.1:50052 KEEL_WORKER_TOKEN=... node dist/examples/worker.js
//
// Create one as a user (grpcurl, see the repository README):
//   {"kind": "report.render", "payload": {"title": "Q3", "sections": ["sales", "costs"]}}
import { Worker, RetryableError } from "../src";

const w = new Worker({
  url: process.env.KEEL_JOBS_URL ?? "127.0.0.1:50052",
  token: process.env.KEEL_WORKER_TOKEN ?? "",
  concurrency: Number(process.env.KEEL_WORKER_CONCURRENCY ?? 4),
  shutdownGraceMs: Number(process.env.KEEL_WORKER_SHUTDOWN_GRACE_MS ?? 10000),
  // With an https:// URL: the CA to trust instead of the system's roots.
  caFile: process.env.KEEL_TLS_CA_FILE || undefined,
});

w.handle("report.render", async (job, ctx) => {
  const title = String(job.payload.title ?? "untitled");
  const sections = Array.isArray(job.payload.sections) ? job.payload.sections.map(String) : [];
  if (job.payload.flaky === true && job.attempt === 1) {
    throw new RetryableError("renderer busy, try again"); // retried while attempts remain
  }
  const pages: string[] = [];
  for (const [i, section] of sections.entries()) {
    if (ctx.signal.aborted) return { pages: pages.length, partial: true };
    ctx.progress({ rendered: i, of: sections.length }); // shows on GetJob's Job.progress
    pages.push(`${title}: ${section}`);
    await new Promise((r) => setTimeout(r, Number(job.payload.page_ms ?? 10)));
  }
  return { title, pages: pages.length, toc: pages, attempt: job.attempt };
});

w.run().catch((e) => {
  console.error(e);
  process.exit(1);
});
