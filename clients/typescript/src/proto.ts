// Loads Keel's contract at run time from the .proto files that
// `npm run generate` copies into ./proto; the types in ./generated describe
// what this loader returns (same options as scripts/generate.js).
import * as path from "node:path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import type { ProtoGrpcType as JobsProto } from "./generated/jobs";
import type { ProtoGrpcType as AuthProto } from "./generated/auth";

export const LOADER_OPTIONS: protoLoader.Options = {
  keepCase: false,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
};

/** Where the .proto files are: $KEEL_PROTO_DIR, else the package's ./proto. */
export function protoDir(): string {
  return process.env.KEEL_PROTO_DIR || path.resolve(__dirname, "..", "..", "proto");
}

export function loadJobs(dir = protoDir()): JobsProto {
  const def = protoLoader.loadSync("keel/jobs/v1/jobs.proto", { ...LOADER_OPTIONS, includeDirs: [dir] });
  return grpc.loadPackageDefinition(def) as unknown as JobsProto;
}

export function loadAuth(dir = protoDir()): AuthProto {
  const def = protoLoader.loadSync("keel/auth/v1/auth.proto", { ...LOADER_OPTIONS, includeDirs: [dir] });
  return grpc.loadPackageDefinition(def) as unknown as AuthProto;
}
