#!/usr/bin/env node
// Generates the TypeScript types of Keel's gRPC contract (src/generated/, not
// checked in) with @grpc/proto-loader's proto-loader-gen-types, and copies the
// .proto files that the worker loads at run time into ./proto (also not
// checked in). The .proto files come from $KEEL_PROTO_DIR, else ../../proto
// (this directory's place in the Keel repository).
"use strict";
const fs = require("node:fs");
const path = require("node:path");
const { execFileSync } = require("node:child_process");

const root = path.resolve(__dirname, "..");
const src = path.resolve(process.env.KEEL_PROTO_DIR || path.join(root, "..", "..", "proto"));
const dest = path.join(root, "proto");
const files = ["keel/jobs/v1/jobs.proto", "keel/auth/v1/auth.proto"];

for (const f of files) {
  if (!fs.existsSync(path.join(src, f))) {
    console.error(`generate: ${path.join(src, f)} not found; run from the Keel repository or set KEEL_PROTO_DIR`);
    process.exit(1);
  }
}
fs.rmSync(dest, { recursive: true, force: true });
for (const f of files) {
  fs.mkdirSync(path.dirname(path.join(dest, f)), { recursive: true });
  fs.copyFileSync(path.join(src, f), path.join(dest, f));
}

const out = path.join(root, "src", "generated");
fs.rmSync(out, { recursive: true, force: true });
const bin = require.resolve("@grpc/proto-loader/build/bin/proto-loader-gen-types.js");
// These options must match the loader's in src/proto.ts.
execFileSync(
  process.execPath,
  [bin, "--grpcLib=@grpc/grpc-js", `--outDir=${out}`, `--includeDirs=${dest}`,
   "--longs=String", "--enums=String", "--defaults", "--oneofs", ...files],
  { stdio: ["ignore", "ignore", "inherit"] },
);
console.log(`generate: types for ${files.join(", ")} in src/generated`);
