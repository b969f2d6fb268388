// Run Keel jobs from Node.js.
//
//   const w = new Worker({ url: "127.0.0.1:50052", token });
//   w.handle("report.render", async (job, ctx) => ({ pages: 3 }));
//   await w.run();
export { Worker, RetryableError } from "./worker";
export type { Job, JobContext, Handler, Logger, WorkerOptions } from "./worker";
export type { Json, JsonObject } from "./struct";
export { toStruct, fromStruct } from "./struct";
export { loadJobs, loadAuth, protoDir } from "./proto";
